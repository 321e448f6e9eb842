"""The per-stage 3D geometry of an inflated ResNet encoder: kernel depth and z stride.

The kernel depth ``k_z`` and the z stride are chosen per *stage*, the five resolution
levels of the encoder (:data:`STAGES`): ``stem`` (``conv1``, in-plane stride 2),
``layer1`` (the max-pool before it does the stride-2 step), ``layer2``, ``layer3`` and
``layer4`` (first block strided). An anisotropic volume (e.g. serial-section TEM at
4 x 4 x 40 nm) keeps depth-1 kernels and no z striding in its first stages, until the
in-plane voxel size after striding approaches the z spacing, as the anisotropic 3D
residual U-Net of Xie et al. (2025) keeps z unpooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

STAGES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")


def per_stage(value: int | Sequence[int] | Mapping[str, int], what: str) -> tuple[int, ...]:
    """One int per stage from an int (all stages), a sequence of 5 or a ``{stage: int}`` mapping.

    A mapping may omit stages only when it is used through
    :func:`finetune.models.inflate.inflate_state_dict` with a default; here every stage must be given.
    """
    if isinstance(value, bool):
        raise ValueError(
            f"{what} must be an int, a list of {len(STAGES)} ints or a mapping {{stage: int}}, got {value!r}"
        )
    if isinstance(value, int):
        return (value,) * len(STAGES)
    if isinstance(value, Mapping):
        unknown = set(value) - set(STAGES)
        if unknown:
            raise ValueError(f"{what}: unknown stage(s) {sorted(unknown)}; valid stages: {', '.join(STAGES)}")
        missing = [s for s in STAGES if s not in value]
        if missing:
            raise ValueError(f"{what}: missing stage(s) {missing}; give all of {', '.join(STAGES)}")
        return tuple(int(value[s]) for s in STAGES)
    values = tuple(value)
    if len(values) != len(STAGES) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} must list {len(STAGES)} ints ({', '.join(STAGES)}), got {value!r}")
    return values


@dataclass(frozen=True)
class StageGeometry:
    """Kernel depth and z stride of every encoder stage of a 3D ResNet.

    Attributes:
        kernel_depth: ``k_z`` of the ``k x k`` convolutions of each stage in
            :data:`STAGES` order (odd, >= 1). 1 makes the stage purely in-plane.
        z_stride: z stride of each stage (1 or 2): of ``conv1`` for ``stem``, of the
            max-pool for ``layer1``, of the first block for ``layer2..4``. The in-plane
            stride is always 2, so the total stride is ``(prod(z_stride), 32, 32)``.

    The max-pool before ``layer1`` has kernel depth 3 when it strides in z and 1
    otherwise (no pooling across slices that are not downsampled).
    """

    kernel_depth: tuple[int, ...] = (3, 3, 3, 3, 3)
    z_stride: tuple[int, ...] = (2, 2, 2, 2, 2)

    def __post_init__(self) -> None:
        depth = per_stage(self.kernel_depth, "kernel_depth")
        stride = per_stage(self.z_stride, "z_stride")
        bad = [f"{s}={d}" for s, d in zip(STAGES, depth) if d < 1 or d % 2 == 0]
        if bad:
            raise ValueError(f"kernel_depth must be odd and >= 1 (symmetric 'same' padding), got {', '.join(bad)}")
        bad = [f"{s}={z}" for s, z in zip(STAGES, stride) if z not in (1, 2)]
        if bad:
            raise ValueError(f"z_stride must be 1 or 2 per stage, got {', '.join(bad)}")
        # Normalise lists/mappings to tuples so instances compare and hash by value.
        object.__setattr__(self, "kernel_depth", depth)
        object.__setattr__(self, "z_stride", stride)

    @property
    def total_z_stride(self) -> int:
        """Product of the z strides: the z size multiple the network needs."""
        out = 1
        for z in self.z_stride:
            out *= z
        return out

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """``(z, y, x)`` multiple of the input size for which no internal padding is needed."""
        return (self.total_z_stride, 32, 32)

    def depth_of(self, stage: str) -> int:
        return self.kernel_depth[STAGES.index(stage)]

    def to_dict(self) -> dict[str, list[int]]:
        """Plain lists (YAML/JSON/``torch.save`` friendly); inverse of :meth:`from_any`."""
        return {"kernel_depth": list(self.kernel_depth), "z_stride": list(self.z_stride)}

    @classmethod
    def preset(cls, name: str) -> "StageGeometry":
        """A named geometry.

        * ``isotropic``: ``k_z = 3`` and z stride 2 everywhere (FIB-SEM at equal spacing).
        * ``anisotropic``: stem and ``layer1`` in-plane only (``k_z = 1``, no z stride),
          then ``k_z = 3`` and z stride 2 from ``layer2``: z is pooled 8x while x, y are
          pooled 32x, suiting spacings about 4-8x coarser in z.
        * ``planar``: ``k_z = 1`` and no z stride anywhere: the 2D network applied slice
          by slice (a baseline, and what inflation is compared against).
        """
        presets = {
            "isotropic": cls((3, 3, 3, 3, 3), (2, 2, 2, 2, 2)),
            "anisotropic": cls((1, 1, 3, 3, 3), (1, 1, 2, 2, 2)),
            "planar": cls((1, 1, 1, 1, 1), (1, 1, 1, 1, 1)),
        }
        try:
            return presets[name]
        except KeyError:
            raise ValueError(f"unknown 3D geometry preset {name!r}; valid presets: {', '.join(presets)}") from None

    @classmethod
    def from_spacing(cls, voxel_size: Sequence[float]) -> "StageGeometry":
        """Geometry for a voxel size ``(z, y, x)`` in nm (only the ratio matters).

        Walking through the stages, each halves the in-plane resolution. A stage also
        strides in z once the z spacing is no more than twice the in-plane spacing it
        starts from (so z is never sampled much finer than x, y), and uses ``k_z = 3``
        once z spacing is below twice the in-plane spacing after the stage (neighbouring
        slices are then close enough to correlate like in-plane neighbours).
        """
        vz, vy, vx = (float(v) for v in voxel_size)
        if not all(v > 0 for v in (vz, vy, vx)):
            raise ValueError(f"voxel size must be positive (z, y, x) in nm, got {tuple(voxel_size)}")
        sz, sxy = vz, min(vy, vx)
        depth, stride = [], []
        for _ in STAGES:
            z_step = 2 if sz <= 2 * sxy else 1
            sxy *= 2
            sz *= z_step
            stride.append(z_step)
            depth.append(3 if sz < 2 * sxy else 1)
        return cls(tuple(depth), tuple(stride))

    @classmethod
    def from_any(cls, value: "StageGeometry | str | Mapping | None") -> "StageGeometry":
        """A geometry from an instance, a preset name, ``{"kernel_depth": .., "z_stride": ..}`` or None (isotropic)."""
        if value is None:
            return cls()
        if isinstance(value, StageGeometry):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"kernel_depth", "z_stride"}
            if unknown:
                raise ValueError(f"geometry mapping: unknown key(s) {sorted(unknown)}; valid: kernel_depth, z_stride")
            return cls(value.get("kernel_depth", 3), value.get("z_stride", 2))
        raise ValueError(f"geometry must be a StageGeometry, a preset name or a mapping, got {type(value).__name__}")
