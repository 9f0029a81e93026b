"""Chromosome karyotyping: Varifocal G-Net / L-Net, per-case dispatch, karyogram.

Modules: ``config`` (typed run config), ``data`` (manifests, stain convention, canvas, flips,
slide-disjoint splits), ``model`` (G-Net, localizer, varifocal zoom, L-Net, fusion), ``train``
(four-step resumable schedule), ``evaluate`` (test metrics), ``dispatch`` (greedy and optimal),
``predict`` (predictions.csv + one JSON per case), ``karyogram`` (the figure), and ``api``: the
functions the CLI calls, published as ``holons.karyotype`` (``train``, ``predict``, ``fit_dispatch``,
``karyogram``).
"""
