"""Uninformative-patch filtering: label-free rules, the statistics forest, the ResNet classifier.

Public API (imported lazily, so ``import cemcurate.filtering`` does not load torch):

* :func:`image_statistics` - the four CEM500K image statistics, ``(n, p, p) uint8 -> (n, 4)``;
* :func:`rule_informative_prob` / :func:`rule_reasons` - the label-free ``--filter stats`` rules;
* :func:`make_filter` / :class:`PatchFilter` - ``--filter stats|none|PATH`` for the pipeline;
* :func:`load_classifier`, :func:`predict_informative` - ResNet inference;
* :class:`FilterTrainConfig`, :func:`train_filter` - ``cemcurate filter train``;
* :func:`filter_report_section` - the report section;
* :func:`add_label_command`, :func:`add_filter_command` - CLI builders.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "image_statistics": "features", "FEATURE_NAMES": "features",
    "rule_informative_prob": "rules", "rule_reasons": "rules", "RuleSettings": "rules",
    "make_filter": "filters", "PatchFilter": "filters",
    "load_classifier": "classifier", "predict_informative": "classifier", "Classifier": "classifier",
    "FilterError": "classifier",
    "FilterTrainConfig": "train", "train_filter": "train",
    "filter_report_section": "report",
    "add_label_command": "cli", "add_filter_command": "cli",
    "read_labels": "labels", "append_labels": "labels", "LabelPool": "labels",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cemcurate.filtering.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cemcurate.filtering' has no attribute {name!r}")
