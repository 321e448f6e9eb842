"""Fine-tuning pre-trained ResNet encoders for EM segmentation (after Conrad & Narayan 2021).

Modules: ``config`` (one dataclass per command), ``models`` (registry and ``build_model``, 2D and
3D UNets; weight sources are :mod:`cemcurate.common.weights`), ``labels`` / ``data`` / ``augment``
(training data),
``losses``, ``metrics``, ``train``, ``predict`` (tiling, stack/orthoplane, writers),
``evaluate``, ``benchmark`` and ``cli`` (the ``finetune`` command).
"""
