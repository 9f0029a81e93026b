"""The evaluation API, published as ``holons.evaluate``: one function per ``holons evaluate`` protocol.

Each takes weights (an exported foundation folder, or ``"random"`` with ``arch``), the data and an
output folder, writes ``OUT/results.json`` (and its tables) and returns the summary; ``localize``
takes a localizer model folder (``holons finetune localize``) instead of weights; ``localize_maps``
draws several localizers' maps side by side (a PNG).
"""

from __future__ import annotations

from holons.eval.classify import run_classification as classification
from holons.eval.correspondence import run_correspondence as correspondence
from holons.eval.fewshot_seg import run_fewshot_segmentation as fewshot_segmentation
from holons.eval.laterality import run_laterality as laterality
from holons.eval.localization import run_localization as cam
from holons.eval.localize_figure import draw_localization_maps as localize_maps
from holons.eval.localize_metrics import run_localize_evaluation as localize
from holons.eval.report import compare

__all__ = ["cam", "classification", "compare", "correspondence", "fewshot_segmentation", "laterality",
           "localize", "localize_maps"]
