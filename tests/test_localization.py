"""CAM localization: box metrics against hand-computed cases, CAMs, and the protocol end to end on a
set whose finding is a bright square that an intensity 'backbone' localizes exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from holons.cli import main
from holons.data.annotated import STRUCTURES, load_localization_set
from holons.errors import HolonsError
from holons.eval.localization import class_activation_maps, evaluate_localization
from holons.eval.report import compare, format_headline
from holons.finetune.metrics import box_iou, max_box_acc_v2, region_boxes


def test_box_iou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert box_iou(a, b)[0] == pytest.approx([1 / 7, 1.0, 0.0])


def test_region_boxes_one_per_connected_region():
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:4] = True   # rows 1-2, cols 1-3
    mask[5, 6] = True
    mask[6, 7] = True       # diagonal neighbour: 8-connected, one region
    boxes = sorted(region_boxes(mask).tolist())
    assert boxes == [[0.5, 0.5, 3.5, 2.5], [5.5, 4.5, 7.5, 6.5]]
    assert region_boxes(np.zeros((4, 4), bool)).shape == (0, 4)


def _box_map(size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((size, size))
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1.0
    return m


def test_max_box_acc_v2_by_hand():
    gt = [np.array([[9.5, 9.5, 19.5, 19.5]])]  # pixels 10..19
    exact = max_box_acc_v2([_box_map(32, (10, 10, 20, 20))], gt)
    assert exact["max_box_acc_v2"] == 1.0 and exact["box_acc@0.7"] == 1.0
    elsewhere = max_box_acc_v2([_box_map(32, (0, 22, 8, 30))], gt)
    assert elsewhere["max_box_acc_v2"] == 0.0
    # twice the area (IoU 0.5): localized at IoU 0.3 and 0.5, not at 0.7
    wide = max_box_acc_v2([_box_map(32, (10, 10, 30, 20))], gt)
    assert wide["box_acc@0.3"] == wide["box_acc@0.5"] == 1.0 and wide["box_acc@0.7"] == 0.0
    assert wide["max_box_acc_v2"] == pytest.approx(2 / 3)
    # all regions count: a brighter decoy does not hide the right region at a low threshold
    decoy = _box_map(32, (10, 10, 20, 20)) * 0.5 + _box_map(32, (25, 25, 30, 30))
    scores = max_box_acc_v2([decoy], gt)
    assert scores["max_box_acc_v2"] == 1.0 and scores["best_threshold@0.5"] <= 0.5
    # over images: the share localized
    two = max_box_acc_v2([_box_map(32, (10, 10, 20, 20)), _box_map(32, (0, 22, 8, 30))], gt * 2)
    assert two["max_box_acc_v2"] == 0.5


def test_class_activation_maps_weight_the_channels_and_scale_to_unit_range():
    f = torch.zeros(2, 2, 4, 4)
    f[0, 0, 1, 2] = 5.0   # channel 0 (weight +1) peaks at (1, 2)
    f[0, 1, 3, 0] = 5.0   # channel 1 (weight -1) suppresses (3, 0)
    cams = class_activation_maps(f, np.array([1.0, -1.0]), size=4)
    assert cams.shape == (2, 4, 4) and cams[0].max() == 1.0 and cams[0].min() == 0.0
    assert np.unravel_index(cams[0].argmax(), (4, 4)) == (1, 2)
    assert np.unravel_index(cams[0].argmin(), (4, 4)) == (3, 0)
    assert not cams[1].any()  # a constant map has no peak


class IntensityBackbone(torch.nn.Module):
    """A 'backbone' whose dense features are the image itself, 4x average-pooled (one channel)."""

    name = "intensity"
    embed_dim = 1

    def recorded_input_stats(self):
        return (0.0, 1.0)

    def forward_dense(self, x):
        return F.avg_pool2d(x, 4)


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """40 images of 64 px in the phantom layout: half hold a bright 12 px square (the 'nodule') at a
    random place; every image has a heart mask (a fixed rectangle)."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        image = 0.3 + 0.05 * rng.standard_normal((64, 64))
        has = i % 2 == 0
        x = y = 0.0
        if has:
            x0, y0 = (int(v) for v in rng.integers(2, 50, size=2))
            image[y0:y0 + 12, x0:x0 + 12] = 0.9
            x, y = x0 + 5.5, y0 + 5.5  # centre in pixel coordinates
        ident = f"sq_{i:02d}"
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(root / "images" / f"{ident}.png")
        for s in STRUCTURES:
            mask = np.zeros((64, 64), np.uint8)
            if s == "heart":
                mask[30:50, 20:44] = 255
            (root / "masks" / s).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / s / f"{ident}.png")
        rows.append({"id": ident, "split": "train" if i < 24 else "test", "nodule": int(has),
                     "nodule_x": x, "nodule_y": y, "nodule_size": 12.0 if has else 0.0,
                     "cardiomegaly": int(i % 4 == 1)})
    pd.DataFrame(rows).to_csv(root / "image_table.csv", index=False)
    return root


def test_boxes_from_the_table_and_the_heart_mask(squares):
    data = load_localization_set(squares)
    assert data.name == "phantoms" and data.tasks == ["nodule", "cardiomegaly"]
    assert (data.split == "train").sum() == 24 and data.labels[:, 0].sum() == 20
    first = data.ids.index("sq_00")
    x, y = pd.read_csv(squares / "image_table.csv").loc[0, ["nodule_x", "nodule_y"]]
    assert data.boxes("nodule", first).tolist() == [[x - 6, y - 6, x + 6, y + 6]]
    assert data.boxes("cardiomegaly", first).tolist() == [[19.5, 29.5, 43.5, 49.5]]


def test_the_protocol_finds_the_square_and_beats_the_data_prior(squares):
    summary, items = evaluate_localization(IntensityBackbone(), load_localization_set(squares), size=64,
                                           tasks=["nodule"])
    r = summary["results"]["nodule"]
    assert r["probe_auc"] == 1.0 and r["n_test_positive"] == 8 and r["peak_in_box"] == 1.0
    assert r["max_box_acc_v2"] >= 0.9 and r["box_acc@0.7"] >= 0.75
    assert r["prior"]["max_box_acc_v2"] < 0.5  # the squares sit anywhere: the prior cannot find them
    assert summary["feature_grid"] == [16, 16] and len(items) == 8
    with pytest.raises(HolonsError, match="unknown task"):
        evaluate_localization(IntensityBackbone(), load_localization_set(squares), tasks=["effusion"])


def test_cli_and_compare_run_cam(squares, tmp_path, capsys):
    torch.set_num_threads(1)
    rc = main(["evaluate", "cam", "--weights", "random", "--arch", "resnet10t", "--data", str(squares),
               "--out", str(tmp_path / "cam"), "--size", "64", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MaxBoxAccV2 %" in printed and "data prior" in printed
    assert (tmp_path / "cam" / "results.json").is_file() and (tmp_path / "cam" / "items.csv").is_file()
    summary = compare({"random": "random"}, squares, tmp_path / "report", arch="resnet10t", seeds=(0,),
                      protocols=("cam",), fast=True, device="cpu")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## CAM localization" in text and "| MaxBoxAccV2 (%) ↑ | nodule |" in text
    assert "nodule, data prior" in text
    assert {r["metric"] for r in summary["table"]} == {"MaxBoxAccV2 (%)", "probe AUC"}
    assert "CAM nodule % ↑" in format_headline(summary)
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    pd.DataFrame({"id": ["a"], "split": ["train"]}).to_csv(plain / "image_table.csv", index=False)
    with pytest.raises(HolonsError, match="no findings with locations"):
        load_localization_set(plain)


def test_a_corrupt_image_is_skipped_and_counted(squares, tmp_path):
    import shutil

    root = tmp_path / "squares"
    shutil.copytree(squares, root)
    (root / "images" / "sq_01.png").write_bytes(b"not a png")  # a train image without the finding
    summary, _ = evaluate_localization(IntensityBackbone(), load_localization_set(root), size=64,
                                       tasks=["nodule"])
    assert summary["unreadable"] == 1 and summary["n_train"] == 23 and summary["n_test"] == 16
    assert summary["results"]["nodule"]["max_box_acc_v2"] >= 0.9
