"""cemcurate: turn heterogeneous EM files into a curated, non-redundant patch dataset.

The public entry points are the ``cemcurate`` command (see ``cemcurate --help``) and
:func:`open_patches`, which opens the curated patches of a build folder.
"""

from cemcurate.common.lazy import lazy_import

__all__ = ["PatchStore", "open_patches"]

# Lazy, so that importing a compute module (cemcurate.dhash, cemcurate.dedup) does not load
# pandas through cemcurate.store: a plain import here makes `import cemcurate.dhash` about
# 0.3 s slower (0.13-0.21 s -> 0.43-0.55 s, measured).
_store = lazy_import("cemcurate.store")


def __getattr__(name: str):
    if name in __all__:
        return getattr(_store, name)
    raise AttributeError(f"module 'cemcurate' has no attribute {name!r}")
