"""Write the data of the NeuroProof boundary benchmark (``benchmarks/finetune/neuroproof_boundary.yaml``).

Source: FlyEM NeuroProof ``training_sample2`` (FIB-SEM of the Drosophila medulla, 250^3
uint8 voxels of 10 nm; ``grayscale_maps/*.png`` and ``groundtruth.h5.gz``). Targets are
neuron boundaries: voxels whose body id differs from a 6-neighbour
(:func:`finetune.neuroproof.boundary_map`, computed on the whole cube). The split::

    OUT/neuroproof_boundary/train/image.tif, boundary.tif   z 0-99, all y, x         (100 x 250 x 250)
    OUT/neuroproof_boundary/test/image.tif, boundary.tif    z 150-249, y, x 0-127    (100 x 128 x 128)

(a 50-slice gap between them). The TIFFs store the 10 nm voxel size, so 3D training with
``geometry: auto`` treats them as isotropic. Files are written atomically; a second run with
the same source and settings finds ``prepared.json`` and writes nothing.

Usage (from the repository root)::

    .venv/bin/python benchmarks/prepare_neuroproof.py --out /tmp/np_data
    finetune benchmark benchmarks/finetune/neuroproof_boundary.yaml --dims 2d 3d --data-root /tmp/np_data ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from cemcurate.common.atomic import atomic_path  # noqa: E402
from cemcurate.io import write_volume  # noqa: E402
from finetune.benchmark import default_data_root  # noqa: E402
from finetune.neuroproof import boundary_map, neuroproof_sample  # noqa: E402

NAME = "neuroproof_boundary"
VOXEL_NM = (10.0, 10.0, 10.0)
# A 50-slice gap in z between training and test data.
TRAIN_REGION = (slice(0, 100), slice(None), slice(None))
TEST_REGION = (slice(150, 250), slice(0, 128), slice(0, 128))
SPLITS = {"train": TRAIN_REGION, "test": TEST_REGION}


def default_source() -> Path:
    return default_data_root() / "neuroproof_flyem" / "training_sample2"


def prepare_neuroproof(source: str | Path, out: str | Path, limit: Sequence[int] | None = None) -> Path:
    """Write ``OUT/neuroproof_boundary/{train,test}/{image,boundary}.tif``; return that folder.

    Args:
        source: the ``training_sample2`` folder.
        out: the benchmark data root.
        limit: optional ``(z, y, x)``: keep at most this many voxels of each split along each
            axis, from its start (small data for tests).

    Raises:
        ValueError: ``source`` is not a NeuroProof sample.
    """
    source, dest = Path(source), Path(out) / NAME
    if not (source / "groundtruth.h5.gz").is_file() or not any((source / "grayscale_maps").glob("*.png")):
        raise ValueError(
            f"{source}: NeuroProof training_sample2 not found (expected grayscale_maps/*.png and "
            "groundtruth.h5.gz); pass --source or set CEM_DATA"
        )
    stamp = {
        "source": str(source.resolve()),
        "limit": list(limit) if limit else None,
        "splits": {k: [[s.start, s.stop] for s in v] for k, v in SPLITS.items()},
    }
    stamp_path = dest / "prepared.json"
    files = [dest / split / f"{kind}.tif" for split in SPLITS for kind in ("image", "boundary")]
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp and all(f.is_file() for f in files):
        return dest
    stamp_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        image, bodies = neuroproof_sample(source, tmp)
    boundary = boundary_map(bodies)
    head = tuple(slice(0, n) for n in limit) if limit else ()
    for split, region in SPLITS.items():
        write_volume(dest / split / "image.tif", image[region][head], voxel_size=VOXEL_NM)
        write_volume(dest / split / "boundary.tif", boundary[region][head], voxel_size=VOXEL_NM)
    with atomic_path(stamp_path) as tmp:
        tmp.write_text(json.dumps(stamp, indent=2))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", required=True, type=Path, help="benchmark data root (written: OUT/neuroproof_boundary)"
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="NeuroProof training_sample2 folder (default: $CEM_DATA or ../shared/data "
        "/neuroproof_flyem/training_sample2)",
    )
    args = parser.parse_args(argv)
    try:
        dest = prepare_neuroproof(args.source or default_source(), args.out)
    except (ValueError, OSError) as exc:
        print(f"prepare_neuroproof: error: {exc}", file=sys.stderr)
        return 2
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
