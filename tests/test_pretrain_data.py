"""Data order and view batches of `pretrain moco`, on a store of real EM patches.

Also home of :func:`build_real_store`, which the other ``test_pretrain_*`` modules import to
build a curated store from real tiles (``cemcurate build`` is developed in parallel).
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from cemcurate.manifest import read_manifest, write_manifest
from cemcurate.store import StoreError, open_patches, write_patch_store
from pretrain.augment import AugmentParams
from pretrain.data import ViewPairs, data_summary, epoch_order, open_store, view_loader

PATCH = 224

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def real_patches(data_root: Path, vnc_slices: int = 2, neuroproof_slices: int = 16) -> dict[str, np.ndarray]:
    """Real 224 x 224 uint8 patches per source.

    VNC ssTEM: a 4 x 4 grid of tiles from each of the first ``vnc_slices`` 1024 x 1024 slices.
    Neuroproof FIB-SEM: the centre 224 x 224 of ``neuroproof_slices`` slices spread over the cube.
    """
    vnc_files = sorted((data_root / "drosophila_vnc_gerhard" / "stack1" / "raw").glob("*.tif"))[:vnc_slices]
    vnc = [
        tifffile.imread(f)[y : y + PATCH, x : x + PATCH]
        for f in vnc_files
        for y in range(0, 4 * PATCH, PATCH)
        for x in range(0, 4 * PATCH, PATCH)
    ]
    np_files = sorted((data_root / "neuroproof_flyem" / "training_sample2" / "grayscale_maps").glob("*.png"))
    picks = np_files[:: max(1, len(np_files) // neuroproof_slices)][:neuroproof_slices]
    off = (250 - PATCH) // 2
    fib = [np.asarray(iio.imread(f))[off : off + PATCH, off : off + PATCH] for f in picks]
    return {
        "drosophila_vnc_gerhard": np.stack(vnc).astype(np.uint8),
        "neuroproof_flyem": np.stack(fib).astype(np.uint8),
    }


def build_real_store(out_dir: Path, data_root: Path, **kwargs) -> Path:
    """A curated store of real patches in ``out_dir``, with the manifest naming each patch's source."""
    parts = real_patches(data_root, **kwargs)
    write_patch_store(out_dir, np.concatenate(list(parts.values())), source="mixed")
    manifest = read_manifest(out_dir / "manifest.parquet")
    manifest["source"] = np.repeat(list(parts), [len(p) for p in parts.values()])
    manifest["file"] = manifest["source"]
    write_manifest(manifest, out_dir / "manifest.parquet")
    return out_dir


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, data_root) -> Path:
    return build_real_store(tmp_path_factory.mktemp("store"), data_root)


PARAMS = AugmentParams(image_size=64)


def test_real_store_has_both_sources(store_dir):
    store = open_store(store_dir, global_batch=8)
    summary = data_summary(store, store_dir)
    assert summary["sources"] == {"drosophila_vnc_gerhard": 32, "neuroproof_flyem": 16}
    assert summary["n_patches"] == len(store) == 48
    assert 0 < summary["std"] < summary["mean"] < 1


def test_epoch_order_is_a_seeded_permutation():
    a, b, c = epoch_order(100, 1, 0), epoch_order(100, 1, 0), epoch_order(100, 1, 1)
    assert sorted(a) == list(range(100))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ranks_split_each_global_batch(store_dir):
    whole = ViewPairs(store_dir, seed=5, global_batch=8, rank=0, world_size=1, params=PARAMS)
    halves = [ViewPairs(store_dir, seed=5, global_batch=8, rank=r, world_size=2, params=PARAMS) for r in (0, 1)]
    assert whole.steps_per_epoch() == halves[0].steps_per_epoch() == 48 // 8
    for step in (0, 4):
        q, k = whole[3, step]
        assert q.shape == k.shape == (8, 1, 64, 64) and q.dtype == k.dtype == torch.float32
        parts = [h[3, step] for h in halves]
        # The same images with the same views, however the global batch is split.
        assert np.array_equal(np.concatenate([p[0].numpy() for p in parts]), q.numpy())
        assert np.array_equal(np.concatenate([p[1].numpy() for p in parts]), k.numpy())
        # Query and key are different views of the same images.
        assert not np.allclose(q.numpy(), k.numpy())
    # Over an epoch the two ranks see disjoint halves of the store.
    seen = [np.concatenate([h.positions(s) for s in range(h.steps_per_epoch())]) for h in halves]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 48
    # Another epoch, another order.
    assert not np.array_equal(whole[4, 0][0].numpy(), whole[3, 0][0].numpy())
    with pytest.raises(IndexError):
        whole[0, 6]


def test_loader_workers_do_not_change_batches(store_dir):
    ds = ViewPairs(store_dir, seed=1, global_batch=8, rank=0, world_size=1, params=PARAMS)
    # Steps 4..8 run across the end of epoch 0 (6 steps) into epoch 1.
    inline = [q.numpy() for q, _ in view_loader(ds, 4, 9, workers=0, pin_memory=False)]
    spawned = [q.numpy() for q, _ in view_loader(ds, 4, 9, workers=2, pin_memory=False)]
    assert len(inline) == len(spawned) == 5
    assert all(np.array_equal(a, b) for a, b in zip(inline, spawned))
    assert np.array_equal(inline[2], ds[1, 0][0].numpy())
    # Normalised with the store statistics: roughly zero mean, unit spread.
    stacked = np.concatenate(inline)
    assert abs(stacked.mean()) < 1.0 and 0.3 < stacked.std() < 3.0


def test_missing_empty_and_small_stores_are_clear_errors(tmp_path, store_dir):
    with pytest.raises(StoreError, match="no such folder"):
        open_store(tmp_path / "nope", 8)
    (tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="store.json is missing"):
        open_store(tmp_path / "half", 8)
    with pytest.raises(StoreError, match="cannot fill one batch of 64"):
        open_store(store_dir, 64)
    empty = tmp_path / "empty"
    write_patch_store(empty, open_patches(store_dir)[:4])
    manifest = read_manifest(empty / "manifest.parquet")
    manifest["kept"] = False
    write_manifest(manifest, empty / "manifest.parquet")
    with pytest.raises(StoreError, match="no kept patches"):
        open_store(empty, 8)
