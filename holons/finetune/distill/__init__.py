"""Dataset distillation: a few learned synthetic images per class that train a network almost as
well as the real set, with FYI's flip as an option.

Modules: ``config`` (typed run config), ``convnet`` (the small ConvNet-3 used for matching and for
evaluation), ``data`` (the real sets: karyotype manifests prepared as karyotyping prepares them,
radiograph classification sets; writing the distilled set), ``matching`` (distribution and
gradient matching, the FYI flip), ``evaluate`` (a ConvNet trained on distilled / random real / full
data, tested on the held-out split over seeds) and ``api``: :func:`distill`, what ``holons distill``
calls.
"""

from holons.finetune.distill.api import DistillResult, distill
from holons.finetune.distill.config import DistillConfig

__all__ = ["DistillConfig", "DistillResult", "distill"]
