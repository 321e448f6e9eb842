"""Fine-tuning pre-trained ResNet encoders for EM segmentation (after Conrad & Narayan 2021).

Modules: ``config`` (one dataclass per command), ``models`` (registry, 2D UNet-ResNet),
``encoders`` (weight sources), ``labels`` / ``data`` / ``augment`` (training data),
``losses``, ``metrics``, ``train``, ``predict`` (tiling, stack/orthoplane, writers),
``evaluate``, ``benchmark`` and ``cli`` (the ``finetune`` command).
"""
