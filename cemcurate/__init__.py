"""cemcurate: turn heterogeneous EM files into a curated, non-redundant patch dataset.

The public entry points are the ``cemcurate`` command (see ``cemcurate --help``) and
:func:`open_patches`, which opens the curated patches of a build folder.
"""

from cemcurate.store import PatchStore, open_patches

__all__ = ["PatchStore", "open_patches"]
