"""cemcurate: turn heterogeneous EM files into a curated, non-redundant patch dataset.

The public entry points are the ``cemcurate`` command (see ``cemcurate --help``) and
:func:`open_patches`, which opens the curated patches of a build folder.
"""

__all__ = ["PatchStore", "open_patches"]


def __getattr__(name: str):
    # Lazy, so that importing a compute module (e.g. cemcurate.dhash) does not load pandas.
    if name in __all__:
        from cemcurate import store

        return getattr(store, name)
    raise AttributeError(f"module 'cemcurate' has no attribute {name!r}")
