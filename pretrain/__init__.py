"""pretrain: MoCoV2 pre-training on curated EM patches, and publishable encoder weights.

Command line: ``pretrain moco`` (train or resume) and ``pretrain export`` (see ``--help``).
Modules: :mod:`~pretrain.moco` (the algorithm), :mod:`~pretrain.augment` (views),
:mod:`~pretrain.data` (data order and loader), :mod:`~pretrain.distributed` (collectives and
launching), :mod:`~pretrain.train` (the resumable loop), :mod:`~pretrain.checkpoint`,
:mod:`~pretrain.runlog`, :mod:`~pretrain.export_encoder` (publishing; weight-layout mapping is
:mod:`cemcurate.common.weights`),
:mod:`~pretrain.config` (the settings) and :mod:`~pretrain.cli`.
"""
