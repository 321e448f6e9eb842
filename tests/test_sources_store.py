from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from cemcurate.sources import discover_sources, glob_to_regex, load_sidecar
from cemcurate.store import ShardWriter, StoreError, open_patches, write_patch_store


@pytest.mark.parametrize(
    "pattern,path,hit",
    [
        ("*.tif", "a.tif", True),
        ("*.tif", "d/a.tif", False),
        ("**/*.tif", "d/e/a.tif", True),
        ("**/*.tif", "a.tif", True),
        ("stack*/raw/*.png", "stack1/raw/00.png", True),
        ("d/**", "d/x/y.png", True),
        ("im?.png", "im10.png", False),
        ("[ab].png", "b.png", True),
    ],
)
def test_glob_to_regex(pattern, path, hit):
    assert bool(glob_to_regex(pattern).match(path)) is hit


def vnc_layout(root: Path) -> Path:
    """The file layout of the VNC data folder (../shared/data/drosophila_vnc_gerhard), with empty
    files: discovering sources looks at names only, never at contents."""
    vnc = root / "drosophila_vnc_gerhard"
    for i in range(20):
        for name in (
            f"stack1/raw/{i:02d}.tif",
            f"stack2/raw/{i:02d}.tif",
            f"stack1/labels/labels{i:08d}.png",
            f"stack1/membranes/{i:02d}.png",
            f"stack1/mitochondria/{i:02d}.png",
        ):
            (vnc / name).parent.mkdir(parents=True, exist_ok=True)
            (vnc / name).touch()
    (vnc / "README.md").touch()
    return vnc


def test_discover_sources_with_a_sidecar(tmp_path):
    vnc = vnc_layout(tmp_path / "data")
    sidecar = tmp_path / "s.yaml"
    sidecar.write_text(
        "sources:\n"
        "  - {path: 'stack*/raw/*.tif', stack: true, voxel_size: [50, 4.6, 4.6]}\n"
        "  - {path: 'stack1/labels/*', exclude: true}\n"
    )
    found = discover_sources(vnc, sidecar)
    specs, skipped = found.specs, found.skipped
    names = {s.name: s for s in specs}
    assert names["stack1/raw"].options.stack and len(names["stack1/raw"].files) == 20
    assert names["stack1/raw"].options.voxel_size == (50.0, 4.6, 4.6)
    assert [f.name for f in names["stack1/raw"].files][:3] == ["00.tif", "01.tif", "02.tif"]
    # Label pngs are excluded; mitochondria pngs (no rule) are single 2D sources; README is skipped.
    assert not any(n.startswith("stack1/labels") for n in names)
    assert "stack1/mitochondria/00.png" in names
    reasons = {s.name: s.reason for s in skipped}
    assert reasons[next(n for n in reasons if n.startswith("stack1/labels/"))] == "excluded by the sidecar"
    assert "unsupported" in reasons["README.md"]
    assert len({s.key for s in specs}) == len(specs)


def test_sidecar_errors_name_the_file_and_entry(tmp_path):
    bad = tmp_path / "cemcurate.yaml"
    bad.write_text("- {path: '*.tif', voxel: [1, 2, 3]}\n")
    with pytest.raises(ValueError, match=r"cemcurate.yaml: entry 1 has unknown key"):
        load_sidecar(bad)
    bad.write_text("- {path: '*.tif', voxel_size: [1, 2]}\n")
    with pytest.raises(ValueError, match=r"entry 1 \(path '\*.tif'\): 'voxel_size' must be three positive numbers"):
        load_sidecar(bad)


def test_store_random_batches_match_written_real_patches(tmp_path, data_root):
    image = iio.imread(data_root / "isbi2012_unet/train/image/3.png")
    patches = np.stack([image[y : y + 64, x : x + 64] for y in range(0, 512, 64) for x in range(0, 512, 64)])
    store = write_patch_store(tmp_path / "out", patches)
    assert len(store) == 64 and store.patch_size == 64
    idx = np.random.default_rng(1).permutation(64)[:20]
    assert np.array_equal(store[idx], patches[idx])
    assert np.array_equal(store[5], patches[5]) and np.array_equal(store[2:9], patches[2:9])
    assert store.mean == pytest.approx(patches.mean() / 255) and store.std == pytest.approx((patches / 255).std())
    again = open_patches(tmp_path / "out")
    assert np.array_equal(again.patch_ids, np.arange(64))


def test_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not a finished build folder"):
        open_patches(tmp_path)
    with pytest.raises(ValueError, match="expected uint8"):
        with ShardWriter(tmp_path / "x.u8", 8) as w:
            w.append(np.zeros((2, 8, 9), np.uint8))
    assert not (tmp_path / "x.u8").exists()  # a failed shard is never published
