"""Localizer metrics against hand-computed cases, and the evaluation wired end to end with oracle maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from holons.data.preprocess import Preprocessing
from holons.eval import localize_metrics
from holons.eval.localize_metrics import (
    evaluate_localizer,
    format_localize,
    pointing_game_hits,
    top1_localization_hits,
)
from holons.finetune.localize import build_localizer
from holons.finetune.localize.folder import save_localizer
from holons.finetune.localize.predict import MapPrediction
from holons.ssl.backbone import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _square(size: int, x0: int, y0: int, x1: int, y1: int, value: float = 1.0) -> np.ndarray:
    m = np.zeros((size, size))
    m[y0:y1, x0:x1] = value
    return m


def test_pointing_game_by_hand():
    box = [np.array([[9.5, 9.5, 19.5, 19.5]])]   # pixels 10..19
    inside, outside = _square(32, 12, 12, 14, 14), _square(32, 25, 25, 27, 27)
    assert pointing_game_hits([inside, outside], box * 2).tolist() == [True, False]
    # the peak of `outside` is at pixel (25, 25): 5.5 px beyond the box edge
    assert pointing_game_hits([outside], box, tolerance=5.0).tolist() == [False]
    assert pointing_game_hits([outside], box, tolerance=6.0).tolist() == [True]
    two = [np.array([[0.0, 0.0, 3.0, 3.0], [24.5, 24.5, 26.5, 26.5]])]
    assert pointing_game_hits([outside], two).tolist() == [True]


def test_top1_localization_needs_the_right_class_and_a_good_box():
    box = [np.array([[9.5, 9.5, 19.5, 19.5]])]
    exact, wide = _square(32, 10, 10, 20, 20), _square(32, 10, 10, 30, 20)  # IoU 1 and 0.5
    hits = top1_localization_hits([exact, exact], box * 2, [True, False], threshold=0.5)
    assert hits.tolist() == [True, False]
    assert top1_localization_hits([wide], box, [True], threshold=0.5, iou=0.5).tolist() == [True]
    assert top1_localization_hits([wide], box, [True], threshold=0.5, iou=0.7).tolist() == [False]
    # below the threshold the region is not there at all
    assert top1_localization_hits([exact * 0.4], box, [True], threshold=0.5).tolist() == [False]


def test_evaluation_with_oracle_maps_scores_perfectly(tmp_path, monkeypatch):
    """A set of four 24 px images (two with a boxed finding) and a model folder whose predictions are
    replaced by maps equal to the box masks: localization is perfect, AUC follows the probabilities."""
    rows = []
    for i, (label, box) in enumerate([(1, (4, 6, 12, 14)), (1, (10, 2, 20, 8)), (0, None), (0, None)]):
        Image.fromarray(np.full((24, 24), 100, np.uint8)).save(tmp_path / f"im{i}.png")
        row = {"path": f"im{i}.png", "label": ["absent", "present"][label], "split": "test"}
        if box:
            row.update(x0=box[0] - 0.5, y0=box[1] - 0.5, x1=box[2] - 0.5, y1=box[3] - 0.5)
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "set.csv", index=False)
    module = build_localizer("cam", create_backbone("test_resnet"), 2)
    folder = save_localizer(module, tmp_path / "model", method="cam", architecture="test_resnet",
                            backbone_args={}, classes=["absent", "present"],
                            preprocessing=Preprocessing(size=32), config={})

    def oracle(model, paths, *, target, device, progress):
        maps = [np.zeros((24, 24)) for _ in paths]
        for m, row in zip(maps, rows, strict=True):
            if "x0" in row:
                m[int(row["y0"] + 0.5):int(row["y1"] + 0.5), int(row["x0"] + 0.5):int(row["x1"] + 0.5)] = 1.0
        probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.55, 0.45], [0.9, 0.1]])
        return MapPrediction([f"im{i}.png" for i in range(4)], maps, np.zeros((4, 4)), np.asarray(target),
                             probs, ["absent", "present"])

    monkeypatch.setattr(localize_metrics, "predict_maps", oracle)
    summary, items = evaluate_localizer(folder, tmp_path / "set.csv")
    assert summary["n_images"] == 4 and summary["n_scored"] == 2 and summary["split"] == "test"
    assert summary["max_box_acc_v2"] == 1.0 and summary["pointing_game"] == 1.0
    assert summary["classification_auc"] == pytest.approx(0.75)  # 3 of the 4 positive-negative pairs
    assert summary["accuracy"] == 0.75
    # image 1 is misclassified: found, but not a top-1 localization
    assert summary["top1_localization"] == 0.5 and items["top1_loc_hit"].tolist() == [True, False]
    assert "cam" in format_localize([summary])
