"""Benchmarks of batched dHash and of near-duplicate grouping.

Run from the repository root:

    .venv/bin/python benchmarks/bench_dedup.py [--data ../shared/data] [--skip-1e6]

Prints Markdown tables:
1. dHash of real 224 x 224 EM patches: ``cemcurate.dhash.dhash64`` versus one
   ``imagehash.dhash`` call per patch, on one core (BLAS limited to one thread); hashes are
   asserted identical; then ``workers`` = 1 and 2.
2. Grouping versus two plain greedy reference loops written here, on the same hashes and
   the same visiting order (exemplars asserted identical): real hashes, synthetic N = 1e4
   and 1e5; then our grouping alone at N = 1e5 and 1e6 (and a uniform worst case), each in
   a fresh child process so its peak RSS is its own.
3. Exhaustive range search with faiss ``IndexBinaryFlat`` (exact, O(N^2) popcounts in C,
   all cores), for scale.

Synthetic hashes imitate real ones, which come in clusters (neighbouring slices of a volume
differ by a few bits): N/8 uniformly random 64-bit centres; each hash copies a random centre
and flips k ~ Uniform{0..8} random bits (positions drawn with replacement). About 18% of the
hashes end up as exemplars at max_hamming = 11 (CEMraw -> CEMdedup kept 21%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import PIL
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# cemcurate.dedup loads numpy only: no pandas or pyarrow (the patch store), whose import peak
# would hide the memory the grouping itself needs in --child runs.
from cemcurate.common.lazy import lazy_import  # noqa: E402
from cemcurate.dedup import group_near_duplicates  # noqa: E402
from cemcurate.dhash import dhash64, dhash_hex  # noqa: E402

faiss = lazy_import("faiss")
imagehash = lazy_import("imagehash")
threadpoolctl = lazy_import("threadpoolctl")

PATCH = 224
MAX_HAMMING = 11


# ----------------------------------------------------------------------------- data


def real_patches(data: Path) -> np.ndarray:
    """Real 224 x 224 uint8 patches: VNC stack1+2 tiles, neuroproof planes, ISBI tiles."""
    patches = []
    for stack in ("stack1", "stack2"):
        for f in sorted((data / "drosophila_vnc_gerhard" / stack / "raw").glob("*.tif")):
            section = tifffile.imread(f)[: 4 * PATCH, : 4 * PATCH]
            patches.extend(section.reshape(4, PATCH, 4, PATCH).transpose(0, 2, 1, 3).reshape(-1, PATCH, PATCH))
    files = sorted((data / "neuroproof_flyem" / "training_sample2" / "grayscale_maps").glob("*.png"))
    vol = np.stack([iio.imread(f) for f in files])
    patches.extend(vol[:, :PATCH, :PATCH])
    patches.extend(vol.transpose(1, 0, 2)[:, -PATCH:, :PATCH])
    patches.extend(vol.transpose(2, 0, 1)[:, :PATCH, -PATCH:])
    for split in ("train/image", "test"):
        for f in sorted((data / "isbi2012_unet" / split).glob("*.png")):
            image = iio.imread(f)[: 2 * PATCH, : 2 * PATCH]
            patches.extend(image.reshape(2, PATCH, 2, PATCH).transpose(0, 2, 1, 3).reshape(-1, PATCH, PATCH))
    return np.ascontiguousarray(np.stack(patches))


def clustered_hashes(n: int, seed: int, mean_cluster: int = 8, max_flips: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**64, max(1, n // mean_cluster), dtype=np.uint64, endpoint=False)
    hashes = centres[rng.integers(0, len(centres), n)]
    n_flips = rng.integers(0, max_flips + 1, n)
    for k in range(max_flips):
        chosen = n_flips > k
        hashes[chosen] ^= np.uint64(1) << rng.integers(0, 64, chosen.sum()).astype(np.uint64)
    return hashes


def uniform_hashes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


# ----------------------------------------------------------------------------- references


def reference_per_patch(hashes: np.ndarray, max_hamming: int, order: np.ndarray) -> np.ndarray:
    """Visit every patch; an unassigned one claims all unassigned within the threshold."""
    exemplar = np.full(len(hashes), -1, dtype=np.int64)
    for i in order:
        if exemplar[i] < 0:
            close = np.bitwise_count(hashes ^ hashes[i]) <= max_hamming
            exemplar[(exemplar < 0) & close] = i
    return exemplar


def reference_shrinking(hashes: np.ndarray, max_hamming: int, order: np.ndarray) -> np.ndarray:
    """The same rule, keeping only the unassigned patches (in visiting order) in an array."""
    exemplar = np.full(len(hashes), -1, dtype=np.int64)
    remaining = np.asarray(order, dtype=np.int64)
    while len(remaining):
        leader = remaining[0]
        close = np.bitwise_count(hashes[remaining] ^ hashes[leader]) <= max_hamming
        exemplar[remaining[close]] = leader
        remaining = remaining[~close]
    return exemplar


def reference_cem500k(hashes: np.ndarray, max_hamming: int, order: np.ndarray) -> np.ndarray:
    """The released CEM500K deduplication loop (cem-dataset ``deduplicate.py``), re-stated.

    Hashes as (N, 64) boolean bit arrays in visiting order; the first remaining hash
    claims every remaining one whose XOR bit count is within the threshold, and the
    claimed rows are deleted from the arrays. Returns each patch's exemplar index.
    """
    bits = ((hashes[order][:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    remaining = np.asarray(order, dtype=np.int64)
    exemplar = np.full(len(hashes), -1, dtype=np.int64)
    while len(bits):
        matches = np.where(np.logical_xor(bits[0], bits).sum(1) <= max_hamming)[0]
        exemplar[remaining[matches]] = remaining[matches[0]]
        bits = np.delete(bits, matches, axis=0)
        remaining = np.delete(remaining, matches)
    return exemplar


def best_times(functions: dict, repeats: int) -> dict:
    """{name: (best seconds, result)}; the functions take turns, so that a load spike from
    other processes on a shared machine hits them alike rather than one of them."""
    best = {name: (float("inf"), None) for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            t0 = time.perf_counter()
            result = fn()
            best[name] = (min(best[name][0], time.perf_counter() - t0), result)
    return best


# ----------------------------------------------------------------------------- sections


def bench_dhash(data: Path) -> list[str]:
    patches = real_patches(data)
    rows = [
        "| dHash, real 224 x 224 patches | patches | time | patches/s | ratio |",
        "|---|---|---|---|---|",
    ]
    with threadpoolctl.threadpool_limits(1):
        timed = best_times(
            {
                "imagehash": lambda: [str(imagehash.dhash(Image.fromarray(p), hash_size=8)) for p in patches],
                "dhash64": lambda: dhash64(patches),
            },
            3,
        )
        (t_ref, expected), (t_ours, hashes) = timed["imagehash"], timed["dhash64"]
        assert dhash_hex(hashes) == expected, "dhash64 differs from imagehash.dhash"
        rows.append(
            f"| imagehash.dhash, one PIL call per patch, 1 core | {len(patches)} | {t_ref:.3f} s | "
            f"{len(patches) / t_ref:.0f} | 1.0 |"
        )
        rows.append(
            f"| dhash64, batched, 1 core | {len(patches)} | {t_ours:.3f} s | {len(patches) / t_ours:.0f} | "
            f"{t_ref / t_ours:.1f} |"
        )
        big = np.concatenate([patches] * 3)
        timed = best_times({workers: (lambda w=workers: dhash64(big, workers=w)) for workers in (1, 2)}, 3)
        for workers, (t_w, h_w) in timed.items():
            assert np.array_equal(h_w, timed[1][1])
            rows.append(
                f"| dhash64, workers={workers} (BLAS 1 thread each) | {len(big)} | {t_w:.3f} s | "
                f"{len(big) / t_w:.0f} | {t_ref / len(patches) * len(big) / t_w:.1f} |"
            )
    return rows


def time_grouping_child(kind: str, n: int) -> dict:
    """Run one grouping in a fresh interpreter; return its time and peak RSS before and after.

    The process's RSS before the call (interpreter, imports, the hashes) is already its high
    water mark, so the growth of the peak is the extra memory the grouping needed."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(n)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """High-water RSS of this process image. /proc VmHWM restarts at exec; getrusage's
    ru_maxrss would carry over the parent's peak into the child on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, n: int) -> None:
    assert "pandas" not in sys.modules, "cemcurate.dedup must not import pandas"
    hashes = clustered_hashes(n, seed=n) if kind == "clustered" else uniform_hashes(n, seed=n)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    exemplar = group_near_duplicates(hashes, MAX_HAMMING, seed=0)
    seconds = time.perf_counter() - t0
    kept = int(np.sum(exemplar == np.arange(n)))
    print(json.dumps({"seconds": seconds, "kept": kept, "rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}))


def bench_grouping(data: Path, skip_1e6: bool) -> list[str]:
    rows = [
        "| grouping (max_hamming 11) | N | exemplars | time | ratio vs per-patch loop | ratio vs shrinking loop |",
        "|---|---|---|---|---|---|",
    ]
    real = np.unique(dhash64(real_patches(data)), return_inverse=True)[0]
    cases = [
        ("real hashes (VNC, neuroproof, ISBI)", real, 5),
        ("synthetic clustered", clustered_hashes(10_000, 1), 5),
        ("synthetic clustered", clustered_hashes(100_000, 2), 1),
    ]
    for label, hashes, repeats in cases:
        order = np.random.default_rng(0).permutation(len(hashes))
        timed = best_times(
            {
                "per_patch": lambda h=hashes, o=order: reference_per_patch(h, MAX_HAMMING, o),
                "shrinking": lambda h=hashes, o=order: reference_shrinking(h, MAX_HAMMING, o),
                "ours": lambda h=hashes, o=order: group_near_duplicates(h, MAX_HAMMING, order=o),
            },
            repeats,
        )
        (t_loop, expected), (t_shrink, expected_shrink), (t_ours, exemplar) = timed.values()
        assert np.array_equal(exemplar, expected) and np.array_equal(exemplar, expected_shrink)
        kept = int(np.sum(exemplar == np.arange(len(hashes))))
        rows.append(f"| per-patch reference loop, {label} | {len(hashes)} | {kept} | {t_loop:.3f} s | 1.0 | |")
        rows.append(f"| shrinking reference loop, {label} | {len(hashes)} | {kept} | {t_shrink:.3f} s | | 1.0 |")
        rows.append(
            f"| group_near_duplicates, {label} | {len(hashes)} | {kept} | {t_ours:.3f} s | {t_loop / t_ours:.1f} | "
            f"{t_shrink / t_ours:.1f} |"
        )
    rows += [
        "",
        "| grouping vs the CEM500K reference loop (bool bit arrays, np.delete) | N | exemplars | time | ratio |",
        "|---|---|---|---|---|",
    ]
    for label, hashes, _ in cases[:2]:
        order = np.random.default_rng(0).permutation(len(hashes))
        timed = best_times(
            {
                "cem500k": lambda h=hashes, o=order: reference_cem500k(h, MAX_HAMMING, o),
                "ours": lambda h=hashes, o=order: group_near_duplicates(h, MAX_HAMMING, order=o),
            },
            3,
        )
        (t_ref, expected), (t_ours, exemplar) = timed.values()
        assert np.array_equal(exemplar, expected)
        kept = int(np.sum(exemplar == np.arange(len(hashes))))
        rows.append(f"| CEM500K reference loop, {label} | {len(hashes)} | {kept} | {t_ref:.3f} s | 1.0 |")
        rows.append(
            f"| group_near_duplicates, {label} | {len(hashes)} | {kept} | {t_ours:.3f} s | **{t_ref / t_ours:.0f}x** |"
        )
    rows += [
        "",
        "| group_near_duplicates alone, fresh process | N | exemplars | time | peak RSS growth during the call "
        "(process peak) |",
        "|---|---|---|---|---|",
    ]
    sizes = [("clustered", 100_000), ("uniform (worst case: no duplicates)", 100_000)]
    if not skip_1e6:
        sizes.append(("clustered", 1_000_000))
    for kind, n in sizes:
        result = time_grouping_child(kind.split()[0], n)
        growth = result["rss_mb"] - result["rss_before_mb"]
        rows.append(
            f"| synthetic {kind} | {n} | {result['kept']} | {result['seconds']:.2f} s | {growth:.0f} MB "
            f"({result['rss_mb']:.0f} MB) |"
        )
    return rows


def bench_faiss_brute() -> list[str]:
    rows = [
        "| exhaustive range search, faiss IndexBinaryFlat, all cores | pairs | time | pairs/s |",
        "|---|---|---|---|",
    ]
    for n_query, n_base in ((100_000, 100_000), (10_000, 1_000_000)):
        base = clustered_hashes(n_base, seed=3)
        index = faiss.IndexBinaryFlat(64)
        index.add(base.view(np.uint8).reshape(-1, 8))
        queries = base[:n_query].view(np.uint8).reshape(-1, 8)
        t0 = time.perf_counter()
        index.range_search(queries, MAX_HAMMING + 1)  # faiss keeps distance < radius
        seconds = time.perf_counter() - t0
        pairs = n_query * n_base
        rows.append(f"| {n_query} queries x {n_base} hashes | {pairs:.0e} | {seconds:.2f} s | {pairs / seconds:.2e} |")
    pairs_per_s = pairs / seconds
    rows.append(f"| extrapolated: all pairs of 1e6 hashes | 1e+12 | {1e12 / pairs_per_s:.0f} s | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CEM_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--skip-1e6", action="store_true", help="skip the N = 1e6 grouping (about half a minute)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    if not args.data.is_dir():
        sys.exit(f"real data not found at {args.data}: pass --data or set CEM_DATA")
    print(
        f"numpy {np.__version__}, Pillow {PIL.__version__}, {os.cpu_count()} CPUs, load average at start "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    for section in (bench_dhash(args.data), bench_grouping(args.data, args.skip_1e6), bench_faiss_brute()):
        print("\n".join(section), end="\n\n", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
