"""cemcurate.build.cut against plain code: batches across planes, per-patch statistics, the 3-plane sections."""

from __future__ import annotations

import numpy as np

import cemcurate.build.cut as cut_module
from cemcurate.build.cut import cut_patches, iter_standard_planes, patch_statistics
from cemcurate.dhash import dhash64
from cemcurate.io import Volume
from cemcurate.patch_grid import crop_patches, tile_grid
from cemcurate.slicing import ALL_PLANES
from cemcurate.standardize import IntensityWindow
from cemcurate.store import ShardWriter, open_shard


def test_patch_statistics_are_the_plain_float32_mean_and_std():
    rng = np.random.default_rng(0)
    for n, p in ((1, 224), (17, 224), (40, 100)):
        patches = rng.integers(0, 256, (n, p, p), dtype=np.uint8)
        flat = patches.reshape(n, -1).astype(np.float32) / 255.0
        plain = np.stack([flat.mean(1), flat.std(1)], 1)
        assert patch_statistics(patches).dtype == np.float32
        assert np.array_equal(patch_statistics(patches).view(np.uint32), plain.view(np.uint32))  # bit for bit


def test_batched_cut_equals_plane_by_plane(tmp_path, monkeypatch):
    """Planes of 1, several and more patches than a batch holds, with edge crops: the same
    patches, hashes, statistics and shard bytes as cutting each plane on its own."""
    monkeypatch.setattr(cut_module, "BATCH_PATCHES", 5)
    rng = np.random.default_rng(3)
    shapes = [(250, 250), (300, 700), (250, 250), (900, 500), (120, 130), (60, 60), (250, 250)]
    images = [("xy", i, rng.integers(0, 256, shape, dtype=np.uint8)) for i, shape in enumerate(shapes)]
    with ShardWriter(tmp_path / "batched.u8", 224) as writer:
        cut = cut_patches(iter(images), writer, 112)
    planes = [(plane, index, crop_patches(image, tile_grid(*image.shape), 224)) for plane, index, image in images]
    plain = np.concatenate([patches for _, _, patches in planes if len(patches)])
    assert np.array_equal(np.asarray(open_shard(tmp_path / "batched.u8", 224)), plain)
    assert np.array_equal(cut.hashes, dhash64(plain))
    assert np.array_equal(cut.stats, patch_statistics(plain))
    assert list(cut.slices) == [index for _, index, patches in planes for _ in range(len(patches))]
    assert len(cut.grid) == len(plain) == writer.count


def test_three_planes_from_memory_or_from_the_scratch_file_are_the_same(tmp_path, monkeypatch):
    """Small volumes are standardised in memory, larger ones into a scratch memory map: the same sections."""
    data = np.random.default_rng(4).integers(0, 4000, (20, 30, 40), dtype=np.uint16)
    vol = Volume(shape=data.shape, dtype=data.dtype, read_slices=lambda z0, z1: data[z0:z1].copy(), reader="test")
    window = IntensityWindow(100.0, 3900.0)
    scratch = tmp_path / "work" / "v.std.npy"

    def sections():
        return [(p, i, np.array(image)) for p, i, image in iter_standard_planes(vol, window, ALL_PLANES, scratch)]

    in_memory = sections()
    monkeypatch.setattr(cut_module, "IN_MEMORY_VOXELS", 100)
    from_file = sections()
    assert not scratch.exists()
    assert [(p, i) for p, i, _ in in_memory] == [(p, i) for p, i, _ in from_file]
    assert len(in_memory) == 20 + 30 + 40
    assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(in_memory, from_file))
    standard = window.apply(data)
    assert np.array_equal(in_memory[20 + 3][2], standard[:, 3, :])  # xz section 3
    assert np.array_equal(in_memory[-1][2], standard[:, :, 39])  # yz section 39
