"""The released CEM500K curation steps, re-stated as one script: the reference of ``bench_build.py``.

    python benchmarks/cem500k_reference.py RAW OUT [--isotropic] [--min-distance 12]

Re-states the logic of volume-em/cem-dataset ``dataset/patchify2d.py``,
``dataset/patchify3d.py`` and ``dataset/deduplicated/deduplicate.py`` (not their code) for a
folder ``RAW`` of 2D images and 3D TIFF stacks (``--isotropic`` stands in for the voxel size
patchify3d reads with SimpleITK: every 3D stack is then cut in three planes):

* read each image or volume whole with ``skimage.io.imread``; non-uint8 data are scaled by
  the dtype's maximum to uint8, as the scripts do;
* cut every cross-section (xy; xz and yz too for isotropic volumes) into 224-px tiles from
  the top-left, ``round(side / 224)`` tiles per side, the last one cut short at the border
  (``patch_crop`` / ``patch_and_hash``);
* hash each tile with ``imagehash.dhash(Image.fromarray(tile).resize((224, 224), BILINEAR), 8)``;
* deduplicate each source with the greedy loop on (N, 64) boolean hash arrays (a random
  permutation; the first remaining hash claims every remaining one within ``--min-distance``
  bits, the claimed rows deleted);
* pickle the exemplar patches and their names, one file per source (``OUT/<name>.pkl``).

Two departures, both to give it exactly the work the build does: every slice of a volume is
cut (the released ``np.arange(0, nmax)`` skips the last one), and one process runs the sources
in turn (the scripts' ``Pool`` would only add start-up cost on two cores).

Prints one JSON line: patch counts and seconds per step (``imports`` from interpreter start).
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import imagehash  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import io  # noqa: E402

CROP = 224
MAX_VALUES_BY_DTYPE = {
    np.dtype("uint8"): 255,
    np.dtype("uint16"): 65535,
    np.dtype("int16"): 32767,
    np.dtype("uint32"): 4294967295,
    np.dtype("float32"): 1.0,
}


def to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    return (image.astype(np.float32) / MAX_VALUES_BY_DTYPE[image.dtype] * 255).astype(np.uint8)


def tiles(image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``(location, tile)`` of the reference's grid: round(side / 224) tiles per side, at least one."""
    if image.ndim == 3:
        image = image[..., 0]
    ysize, xsize = image.shape
    ny, nx = max(1, int(round(ysize / CROP))), max(1, int(round(xsize / CROP)))
    out = []
    for y in range(ny):
        ys, ye = y * CROP, min(y * CROP + CROP, ysize)
        for x in range(nx):
            xs, xe = x * CROP, min(x * CROP + CROP, xsize)
            out.append((f"{ys}-{ye}_{xs}-{xe}", image[ys:ye, xs:xe]))
    return out


def dhash_bits(tile: np.ndarray) -> np.ndarray:
    return imagehash.dhash(Image.fromarray(tile).resize((CROP, CROP), resample=Image.BILINEAR), hash_size=8).hash


def deduplicate(hashes: list[np.ndarray], min_distance: int, rng: np.random.Generator) -> list[int]:
    """Indices of the exemplars: the released greedy loop on boolean hash arrays."""
    bits = np.array(hashes).reshape(len(hashes), -1)
    order = rng.permutation(len(bits))
    bits = bits[order]
    exemplars = []
    while len(bits):
        matches = np.where(np.logical_xor(bits[0], bits).sum(1) <= min_distance)[0]
        exemplars.append(int(order[matches[0]]))
        bits = np.delete(bits, matches, axis=0)
        order = np.delete(order, matches, axis=0)
    return exemplars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--isotropic", action="store_true", help="cut 3D stacks in xy, xz and yz")
    parser.add_argument("--min-distance", type=int, default=12, help="the released scripts' default")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = {"imports": time.perf_counter() - _START, "decode": 0.0, "cut+hash": 0.0, "group": 0.0, "write": 0.0}
    rng = np.random.default_rng(0)
    n_raw = n_kept = 0
    for entry in sorted(args.raw.iterdir()):
        t0 = time.perf_counter()
        data = to_uint8(io.imread(entry))
        t1 = time.perf_counter()
        names, patches, hashes = [], [], []
        if data.ndim == 2 or (data.ndim == 3 and data.shape[-1] in (3, 4)):
            sections = [("2d", data)]
        else:
            axes = (0, 1, 2) if args.isotropic else (0,)
            sections = [(f"{axis}_{i}", np.take(data, i, axis=axis)) for axis in axes for i in range(data.shape[axis])]
        for where, section in sections:
            for loc, tile in tiles(section):
                names.append(f"{entry.stem}-LOC-{where}_{loc}")
                patches.append(tile)
                hashes.append(dhash_bits(tile))
        t2 = time.perf_counter()
        exemplars = deduplicate(hashes, args.min_distance, rng)
        t3 = time.perf_counter()
        with open(args.out / f"{entry.stem}.pkl", "wb") as handle:
            pickle.dump({"names": [names[i] for i in exemplars], "patches": [patches[i] for i in exemplars]}, handle)
        t4 = time.perf_counter()
        for step, dt in zip(("decode", "cut+hash", "group", "write"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            seconds[step] += dt
        n_raw, n_kept = n_raw + len(patches), n_kept + len(exemplars)
    seconds["total"] = time.perf_counter() - _START
    print(json.dumps({"n_raw": n_raw, "n_kept": n_kept, "seconds": {k: round(v, 3) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
