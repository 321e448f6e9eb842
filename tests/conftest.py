"""Shared fixtures: where the real EM data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_data_root() -> Path | None:
    """The real-data folder: ``$CEM_DATA`` if set, else ``<repo>/../shared/data``."""
    candidate = Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


def require(path: Path) -> Path:
    """``path`` if it exists; otherwise skip the test, naming the missing real-data file."""
    if not path.exists():
        pytest.skip(f"real data file missing: {path}")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = find_data_root()
    if root is None:
        pytest.skip("real EM data not found: set CEM_DATA or place it at ../shared/data (see README)")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module with one torch thread (restored afterwards).

    The test machine's two cores are shared; OpenMP threads spin-waiting for a busy core
    make small convolutions many times slower than a single thread.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def neuroproof_volume(data_root: Path):
    """FIB-SEM Drosophila medulla, training_sample2: uint8 (250, 250, 250), 10 nm isotropic."""
    import imageio.v3 as iio
    import numpy as np

    files = sorted((data_root / "neuroproof_flyem" / "training_sample2" / "grayscale_maps").glob("*.png"))
    if len(files) != 250:
        pytest.skip(f"expected 250 neuroproof slices in {data_root}, found {len(files)}")
    return np.stack([iio.imread(f) for f in files])


@pytest.fixture(scope="session")
def neuroproof_boundaries(data_root: Path, tmp_path_factory):
    """training_sample2 image ``uint8[250, 250, 250]`` and its neuron boundaries ``uint8`` 0/1."""
    from finetune.neuroproof import boundary_map, neuroproof_sample

    sample = data_root / "neuroproof_flyem" / "training_sample2"
    if not (sample / "groundtruth.h5.gz").is_file():
        pytest.skip(f"{sample}/groundtruth.h5.gz not found")
    image, bodies = neuroproof_sample(sample, tmp_path_factory.mktemp("neuroproof"))
    return image, bodies, boundary_map(bodies)


@pytest.fixture(scope="session")
def vnc(data_root: Path, tmp_path_factory) -> Path:
    """VNC stack-1 (Gerhard et al. 2013) slices 00-19 and their mitochondria masks, downsampled
    4x to 256 x 256 (18.4 nm pixels) as ``raw/NN.png`` and ``mito/NN.png`` in a temporary folder,
    so tiny training runs fit a CPU test budget."""
    import imageio.v3 as iio
    import numpy as np
    from skimage.transform import downscale_local_mean

    src = data_root / "drosophila_vnc_gerhard/stack1"
    if not (src / "raw/00.tif").is_file():
        pytest.skip(f"{src} not found")
    out = tmp_path_factory.mktemp("vnc4x")
    (out / "raw").mkdir()
    (out / "mito").mkdir()
    for i in range(20):
        raw = downscale_local_mean(iio.imread(src / f"raw/{i:02d}.tif"), (4, 4))
        mito = downscale_local_mean(iio.imread(src / f"mitochondria/{i:02d}.png"), (4, 4))
        iio.imwrite(out / f"raw/{i:02d}.png", np.rint(raw).astype(np.uint8))
        iio.imwrite(out / f"mito/{i:02d}.png", np.rint(mito).astype(np.uint8))
    return out
