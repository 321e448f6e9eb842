"""A large volume as many tasks of a Dask build: xy slabs, then xz / yz blocks, then one reduce.

On one machine a volume is one task (:func:`cemcurate.build.source.process_source`). On a
cluster a volume of more than :data:`SPLIT_CHUNKS` chunks of ``cfg.dask_chunk_voxels`` is
cut by many workers at once:

1. :func:`plan_split` (a task, reading only): the volume's header, planes and intensity
   window, and the chunks: z slabs for the xy plane; y blocks (xz plane) and x blocks (yz
   plane) for a volume cut in three planes. The client then creates the chunks' scratch
   space once (:func:`create_scratch`): a plan task that Dask re-runs after its worker died
   must not wipe slabs the xy chunks already wrote while the xz / yz chunks read them;
2. :func:`cut_chunk` (a task per chunk): standardise and tile its sections into its own
   work shard (``OUT/parts/work/<shard>.<plane><start>.u8``) and return their crops, hashes
   and statistics (hashes are 8 bytes a patch: what travels back is small). xy slabs of a
   three-plane volume also write their standardised slices into a chunked scratch zarr
   (z chunks = the slabs, so no two tasks write one chunk), which the xz / yz blocks read;
3. :func:`finish_split` (a task, after all of its chunks): the source's patches in the
   order the local build cuts them (plane by plane, section by section), deduplicated and
   written exactly as :func:`~cemcurate.build.source.finish_volume` does for one task.

Every patch is computed from its own pixels only and the chunks are put back in the local
order, so the manifest and the store's bytes equal the local build's. Work files have
fixed names and are written atomically, so a chunk re-run after its worker died rewrites
the same bytes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cemcurate.build.config import BuildConfig
from cemcurate.build.cut import cut_patches, standard_slab
from cemcurate.build.extend import extendable_part
from cemcurate.build.records import CutPatches, PartRecord
from cemcurate.build.resume import new_record
from cemcurate.build.source import (
    VolumeFacts,
    fail_record,
    finish_volume,
    shard_name,
    volume_plan,
    write_part_record,
    write_part_rows,
)
from cemcurate.common.lazy import lazy_import
from cemcurate.io import Volume
from cemcurate.layout import BuildLayout
from cemcurate.slicing import iter_planes
from cemcurate.sources import SourceSpec, open_volumes
from cemcurate.standardize import IntensityWindow
from cemcurate.store import ShardWriter, open_shard

zarr = lazy_import("zarr")

SPLIT_CHUNKS = 4  # a volume of more chunks than this is split into chunk tasks


@dataclass(frozen=True)
class SplitPlan:
    """How one volume of a source is cut by many tasks (see the module docstring)."""

    facts: VolumeFacts
    planes: tuple[str, ...]
    window: IntensityWindow
    notes: tuple[str, ...]
    chunks: tuple[tuple[str, int, int], ...]  # (plane, start, stop) in the local build's order
    shard: str
    record: PartRecord
    # The opened volume travels with the plan (readers pickle as their paths and header facts),
    # so chunk tasks do not read the headers again (250 of them for a stack of 250 PNGs).
    volume: Volume

    def scratch(self, layout: BuildLayout) -> Path:
        return layout.work_file(self.shard, ".std.zarr")


def chunk_ranges(length: int, step: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` covering ``range(length)`` in steps of ``step`` (the last may be shorter)."""
    step = max(1, step)
    return [(i, min(length, i + step)) for i in range(0, length, step)]


def split_chunks(shape: tuple[int, int, int], planes: tuple[str, ...], chunk_voxels: int) -> list[tuple[str, int, int]]:
    """The chunks of a volume, in the order the local build cuts its sections: xy slabs of
    about ``chunk_voxels`` voxels, then y blocks (xz) and x blocks (yz) of about as many."""
    z, y, x = shape
    chunks = [("xy", a, b) for a, b in chunk_ranges(z, chunk_voxels // max(1, y * x))]
    if "xz" in planes:
        chunks += [("xz", a, b) for a, b in chunk_ranges(y, chunk_voxels // max(1, z * x))]
    if "yz" in planes:
        chunks += [("yz", a, b) for a, b in chunk_ranges(x, chunk_voxels // max(1, z * y))]
    return chunks


def may_split(spec: SourceSpec, cfg: BuildConfig) -> bool:
    """Whether a source's files are large enough to hold a volume worth splitting (read from their
    sizes on the client, allowing for 8x compression); the others go straight to one task."""
    try:
        size = sum(f.stat().st_size for f in spec.files)
    except OSError:  # a file that went away fails in its task, with its own message
        return False
    return 8 * size > SPLIT_CHUNKS * cfg.dask_chunk_voxels


def plan_split(spec: SourceSpec, cfg: BuildConfig, out_dir: str | Path) -> SplitPlan | None:
    """The split of ``spec``'s one volume, or None when the source is better done as one task
    (several volumes, a stack that only grew, a volume of at most :data:`SPLIT_CHUNKS`
    chunks) or cannot be read (the one task then records why)."""
    layout = BuildLayout(out_dir)
    try:
        if extendable_part(layout, spec, cfg) is not None:
            return None
        volumes = open_volumes(spec)
        if len(volumes) != 1 or np.prod(volumes[0].shape) <= SPLIT_CHUNKS * cfg.dask_chunk_voxels:
            return None
        vol = volumes[0]
        planes, window, notes = volume_plan(vol, spec, cfg)
    except Exception:  # noqa: BLE001 - the one-task path reads the source again and records the error
        return None
    record = new_record(spec, cfg)
    chunks = split_chunks(tuple(vol.shape), planes, cfg.dask_chunk_voxels)
    return SplitPlan(
        VolumeFacts.of(vol), planes, window, tuple(notes), tuple(chunks), shard_name(record, 0), record, vol
    )


def _chunk_path(layout: BuildLayout, plan: SplitPlan, plane: str, start: int) -> Path:
    return layout.work_file(plan.shard, f".{plane}{start}.u8")


def cut_chunk(
    plan: SplitPlan,
    plane: str,
    start: int,
    stop: int,
    cfg: BuildConfig,
    out_dir: str | Path,
    after: object = None,
) -> CutPatches:
    """Cut the sections ``start:stop`` of ``plane`` into the chunk's work shard; return what was cut.

    ``after``: the xy chunks' results, for xz / yz chunks (so that they start once the scratch
    volume is whole); not used otherwise.
    """
    layout = BuildLayout(out_dir)
    if plane == "xy":
        block = standard_slab(plan.volume, plan.window, start, stop)
        if len(plan.planes) > 1:
            scratch = zarr.open_array(str(plan.scratch(layout)), mode="r+")
            scratch[start:stop] = block
        sections = ((plane, start + k, block[k]) for k in range(block.shape[0]))
    else:
        scratch = zarr.open_array(str(plan.scratch(layout)), mode="r")
        block = np.asarray(scratch[:, start:stop, :] if plane == "xz" else scratch[:, :, start:stop])
        sections = ((plane, start + k, image) for k, image in iter_planes(block, plane, block_bytes=block.nbytes + 1))
    with ShardWriter(_chunk_path(layout, plan, plane, start), cfg.patch_size) as writer:
        return cut_patches(sections, writer, cfg.min_edge)


def create_scratch(plan: SplitPlan, out_dir: str | Path) -> None:
    """The work folder of a plan's chunks and, for a three-plane volume, the scratch zarr its xy
    slabs fill (its z chunks are the slabs). Called once per plan, by the client, before any
    chunk task is submitted: it empties a scratch that is there."""
    layout = BuildLayout(out_dir)
    layout.work_dir.mkdir(parents=True, exist_ok=True)
    if len(plan.planes) == 1:
        return
    slab = next(b - a for p, a, b in plan.chunks if p == "xy")
    z, y, x = plan.facts.shape
    zarr.open_array(
        str(plan.scratch(layout)),
        mode="w",
        shape=(z, y, x),
        chunks=(slab, min(y, 512), min(x, 512)),
        dtype=np.uint8,
        fill_value=0,
        zarr_format=2,
        compressor=None,  # scratch read back once: compressing it costs more than the bytes it saves
    )


def _concat(cuts: list[CutPatches]) -> CutPatches:
    return CutPatches(
        grid=np.concatenate([c.grid for c in cuts]) if cuts else np.zeros((0, 4), np.int64),
        planes=np.concatenate([c.planes for c in cuts]) if cuts else np.array([], object),
        slices=np.concatenate([c.slices for c in cuts]) if cuts else np.zeros(0, np.int64),
        hashes=np.concatenate([c.hashes for c in cuts]) if cuts else np.zeros(0, np.uint64),
        stats=np.concatenate([c.stats for c in cuts]).astype(np.float32) if cuts else np.zeros((0, 2), np.float32),
    )


def finish_split(
    spec: SourceSpec,
    plan: SplitPlan,
    cfg: BuildConfig,
    out_dir: str | Path,
    raw: str | Path,
    cuts: list[CutPatches] | BaseException,
    debug: bool = False,
) -> PartRecord:
    """Deduplicate and write the source from its chunks (``cuts`` in ``plan.chunks`` order, or
    the exception a chunk raised: the source is then recorded as failed); write its part and
    remove the chunks' work files."""
    layout, record = BuildLayout(out_dir), plan.record
    try:
        if isinstance(cuts, BaseException):
            raise cuts
        all_path = layout.work_file(plan.shard, ".all.u8")
        with ShardWriter(all_path, cfg.patch_size) as writer:
            for plane, start, _ in plan.chunks:
                writer.append_from(open_shard(_chunk_path(layout, plan, plane, start), cfg.patch_size))
        name = spec.name
        row, frame = finish_volume(
            plan.facts,
            plan.planes,
            plan.window,
            list(plan.notes),
            _concat(cuts),
            all_path,
            name,
            plan.shard,
            spec,
            cfg,
            layout,
        )
        record.sources.append(row)
        write_part_rows(layout, spec, Path(raw), record, [frame])
    except Exception as exc:  # one bad source must not stop the build
        fail_record(record, spec, exc, debug)
    finally:
        for plane, start, _ in plan.chunks:
            _chunk_path(layout, plan, plane, start).unlink(missing_ok=True)
        shutil.rmtree(plan.scratch(layout), ignore_errors=True)
    return write_part_record(layout, spec, record)
