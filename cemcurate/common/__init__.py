"""Infrastructure shared by every stage (curation, pretraining, fine-tuning), one job a module.

* :mod:`~cemcurate.common.atomic`: atomic file and folder output, file digests;
* :mod:`~cemcurate.common.config`: typed configs (dataclasses, optionally in sections)
  filled from YAML and overridden by command-line flags;
* :mod:`~cemcurate.common.device`: choosing the torch device;
* :mod:`~cemcurate.common.runstate`: what a resumable training loop needs (atomic
  checkpoints, RNG capture, the resume check, CSV logs, the AMP optimiser step);
* :mod:`~cemcurate.common.archs`: the one table of encoder architectures every stage supports;
* :mod:`~cemcurate.common.weights`: weight specs (``random | imagenet | cem500k:PATH | PATH``)
  resolved to state dicts with their normalisation and provenance.

It lives in ``cemcurate`` because that is the lowest package: ``pretrain`` and ``finetune``
import it, and ``cemcurate`` never imports them.
"""
