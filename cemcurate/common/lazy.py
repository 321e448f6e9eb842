"""The one lazy-import pattern of the toolkit, for optional heavy dependencies.

Modules import what they need at the top. A third-party library that is costly to import
and needed on some code paths only (torch outside the model modules, timm, smp, sklearn,
matplotlib, flask, tensorboard, the format backends h5py, zarr, mrcfile, nibabel, av) is
bound at the top with::

    from cemcurate.common.lazy import lazy_import

    h5py = lazy_import("h5py")
    pyplot = lazy_import("matplotlib.pyplot")

and used as the module itself (``h5py.File(...)``). The import happens at the first
attribute access, so ``cemcurate --help`` or a build that never opens an HDF5 file does not
pay for it, and a missing optional backend only breaks the formats that need it. Unlike
``importlib.util.LazyLoader`` (and ``lazy_loader.load``), a dotted name does not import its
parent package early.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    """A module object that imports ``name`` on first attribute access and forwards to it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_target"])
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_target']!r}>"


def lazy_import(name: str) -> ModuleType:
    """A stand-in for ``import name`` (dotted names allowed) that imports on first use."""
    return _LazyModule(name)
