"""Start-up cost: no heavy library is imported before a command needs it (issue 13, "Speed").

Each check runs in a fresh interpreter and inspects its ``sys.modules``, since this test
process itself has imported everything long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tifffile
from conftest import REPO, require

# What building the command line must not load: the training and plotting stack, and the
# table libraries only a build or an export needs.
NOT_FOR_THE_PARSER = ("torch", "timm", "matplotlib", "sklearn", "pandas", "pyarrow", "scipy")
# What a default build (filter 'stats') of TIFF and PNG files never needs: the training and
# plotting stack, and the backends of other formats (zarr, 0.3 s, once read LZW TIFFs).
NOT_FOR_A_DEFAULT_BUILD = (
    "torch",
    "timm",
    "matplotlib",
    "sklearn",
    "torchvision",
    "segmentation_models_pytorch",
    "scipy",
    "skimage",
    "zarr",
    "h5py",
    "cv2",
)


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules loaded after running ``code`` in a fresh interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_the_command_line_loads_no_heavy_library():
    loaded = loaded_after("import cemcurate.cli")
    assert not loaded & set(NOT_FOR_THE_PARSER), sorted(loaded & set(NOT_FOR_THE_PARSER))


def test_building_every_parser_loads_no_heavy_library():
    """``cemcurate --help`` builds every sub-command's parser, ``filter train`` included."""
    loaded = loaded_after("import cemcurate.cli\ncemcurate.cli.make_parser().format_help()")
    assert not loaded & set(NOT_FOR_THE_PARSER), sorted(loaded & set(NOT_FOR_THE_PARSER))


def test_a_default_build_never_imports_torch(tmp_path, data_root):
    """A build with the default 'stats' filter on 2D images, an LZW TIFF and a stack, one worker
    (so every import happens in the probed process)."""
    raw = tmp_path / "raw"
    (raw / "vnc").mkdir(parents=True)
    for i in range(2):
        os.symlink(require(data_root / f"drosophila_vnc_gerhard/stack1/raw/{i:02d}.tif"), raw / "vnc" / f"{i:02d}.tif")
    os.symlink(require(data_root / "isbi2012_unet/test/0.png"), raw / "isbi.png")
    plate = tifffile.imread(require(data_root / "sem_plate_databar/plateImage2D.tif"))
    tifffile.imwrite(raw / "plate_lzw.tif", plate, compression="lzw")  # re-encoded: compressed TIFFs are common
    (raw / "cemcurate.yaml").write_text("- {path: 'vnc/*.tif', stack: true, voxel_size: [50, 4.6, 4.6]}\n")
    out = tmp_path / "out"
    code = (
        "from cemcurate.cli import main\n"
        f"assert main(['build', {str(raw)!r}, {str(out)!r}, '--workers', '1', '--quiet']) == 0\n"
    )
    loaded = loaded_after(code)
    assert (out / "report.html").is_file() and (out / "manifest.parquet").is_file()
    assert not loaded & set(NOT_FOR_A_DEFAULT_BUILD), sorted(loaded & set(NOT_FOR_A_DEFAULT_BUILD))


def test_the_parser_still_offers_every_command():
    """The lazy bindings keep the commands and their flags as they were."""
    from cemcurate.cli import make_parser

    text = make_parser().format_help()
    for command in ("build", "export", "dedup-preview", "label", "filter"):
        assert command in text
    train = make_parser().parse_args(["filter", "train", "OUT", "--epochs", "2"])
    assert train.epochs == 2 and Path(train.out) == Path("OUT")
