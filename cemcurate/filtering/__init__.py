"""Uninformative-patch filtering: label-free rules, the statistics forest, the ResNet classifier.

One job a module; import what you need from its module:

* :mod:`~cemcurate.filtering.features` - the four CEM500K image statistics, ``(n, p, p) uint8 -> (n, 4)``;
* :mod:`~cemcurate.filtering.rules` - the label-free ``--filter stats`` rules;
* :mod:`~cemcurate.filtering.filters` - :func:`make_filter` / :class:`PatchFilter`, ``--filter stats|none|PATH``;
* :mod:`~cemcurate.filtering.forest` - the Random Forest on the image statistics;
* :mod:`~cemcurate.filtering.classifier` - the ResNet classifier (loads torch);
* :mod:`~cemcurate.filtering.config` - :class:`FilterTrainConfig`, the settings of ``filter train``;
* :mod:`~cemcurate.filtering.train` - ``cemcurate filter train`` (loads torch);
* :mod:`~cemcurate.filtering.labels` - ``OUT/labels.csv``, the labelling pool, contact sheets;
* :mod:`~cemcurate.filtering.label_server` - the ``cemcurate label`` web page;
* :mod:`~cemcurate.filtering.report` - the filter section of ``OUT/report.html``;
* :mod:`~cemcurate.filtering.cli` - the ``label`` and ``filter`` sub-commands.

This package module imports nothing, so importing one of them loads only what it needs.
"""
