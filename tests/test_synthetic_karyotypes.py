"""Synthetic karyotypes: determinism, table-consistent lengths, declared counts, polarity, layout, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from holons.cli import main
from holons.data.synthetic.chromosomes import CHROMOSOME_TABLE, render_chromosome
from holons.data.synthetic.karyotypes import MANIFEST_COLUMNS, generate_karyotypes, render_cell
from holons.data.synthetic.lab_styles import LAB_STYLES, LabStyle
from holons.errors import HolonsError

PKI3_COLUMNS = ["path", "case_id", "slide_id", "cell_no", "class_1to24", "label_0to23", "class_name", "copy",
                "height", "width", "mode"]


def _declared_counts(karyotype: str) -> list[int]:
    """Copies of classes 1..24 from a short ISCN string (independent of the generator's own parser)."""
    total, sex, *changes = karyotype.split(",")
    counts = [2] * 22 + [sex.count("X"), sex.count("Y")]
    for c in changes:
        counts[int(c[1:]) - 1] += {"+": 1, "-": -1}[c[0]]
    assert sum(counts) == int(total), karyotype
    return counts


def _foreground(img: np.ndarray) -> np.ndarray:
    return img < 245  # G-band: the background is exactly 255


def _axis_length(img: np.ndarray) -> float:
    """Extent of the foreground along its principal axis (a bent chromosome reads a little shorter)."""
    yx = np.argwhere(_foreground(img)).astype(float)
    yx -= yx.mean(0)
    axis = np.linalg.svd(yx, full_matrices=False)[2][0]
    proj = yx @ axis
    return float(proj.max() - proj.min() + 1)


def _centromere_fraction(img: np.ndarray) -> float:
    """Row of the narrowest foreground (away from the telomere caps) as a fraction of the height."""
    widths = _foreground(img).sum(1)
    rows = np.flatnonzero(widths)
    widths = widths[rows[0]: rows[-1] + 1]
    n = len(widths)
    lo, hi = int(0.15 * n), int(np.ceil(0.85 * n))
    return (lo + int(np.argmin(widths[lo:hi]))) / n


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("karyo")
    return generate_karyotypes(out, cases=6, seed=3, abnormal_rate=0.5, flip_rate=0.5, workers=1,
                               progress=False)


def test_table_is_iscn_like():
    assert [r.class_1to24 for r in CHROMOSOME_TABLE] == list(range(1, 25))
    assert [r.name for r in CHROMOSOME_TABLE[22:]] == ["X", "Y"]
    assert abs(sum(r.relative_length for r in CHROMOSOME_TABLE[:22]) - 100.0) < 2.0
    for r in CHROMOSOME_TABLE:
        assert 0.1 < r.centromere_index <= 0.5
        starts, ends = np.array([b[0] for b in r.bands]), np.array([b[1] for b in r.bands])
        assert starts[0] == 0.0 and abs(ends[-1] - 1.0) < 1e-9 and np.allclose(starts[1:], ends[:-1])
    assert {r.class_1to24 for r in CHROMOSOME_TABLE if r.acrocentric} == {13, 14, 15, 21, 22}


def test_render_is_deterministic_and_seed_dependent():
    a = render_chromosome(np.random.default_rng(5), 7)
    b = render_chromosome(np.random.default_rng(5), 7)
    c = render_chromosome(np.random.default_rng(6), 7)
    assert a.dtype == np.uint8 and a.ndim == 2
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    # G-band: white background at the border; Q-band: black
    assert (a[0] == 255).all() and (a[-1] == 255).all()
    q = render_chromosome(np.random.default_rng(5), 7, stain="qband")
    assert (q[0] == 0).all() and q.max() > 100


def test_banding_is_class_specific():
    """Straight upright renders of the similar-length classes 10, 11, 12: the band profile of an
    instance matches its own class's mean profile best (what a classifier has to learn)."""

    def profile(img: np.ndarray) -> np.ndarray:
        fg = _foreground(img)
        rows = np.flatnonzero(fg.any(1))
        dark = np.where(fg, 255.0 - img, np.nan)[rows[0]: rows[-1] + 1]
        p = np.nanmean(dark, axis=1)
        p = np.interp(np.linspace(0, 1, 48), np.linspace(0, 1, len(p)), p)
        return (p - p.mean()) / (p.std() + 1e-6)

    classes = (10, 11, 12)
    rng = np.random.default_rng(0)
    profiles = {k: [profile(render_chromosome(rng, k, bend=0.0, rotation_deg=0.0)) for _ in range(12)]
                for k in classes}
    centroids = {k: np.mean(v[:6], axis=0) for k, v in profiles.items()}
    correct = [max(classes, key=lambda c: float(p @ centroids[c])) == k
               for k in classes for p in profiles[k][6:]]
    assert np.mean(correct) >= 0.9


def test_length_ranking_follows_table_but_neighbours_overlap():
    rng = np.random.default_rng(1)
    lengths: dict[int, list[float]] = {k: [] for k in range(1, 25)}
    for _ in range(8):
        for k, _copy, _pol, img in render_cell(rng, [2] * 22 + [1, 1]):
            lengths[k].append(_axis_length(img))
    means = [np.mean(lengths[k]) for k in range(1, 25)]
    rho = spearmanr(means, [r.relative_length for r in CHROMOSOME_TABLE]).statistic
    assert rho > 0.9
    # cell-to-cell condensation: length alone does not separate neighbouring classes
    for a, b in ((9, 10), (10, 11), (11, 12), (13, 14)):
        assert max(lengths[b]) > min(lengths[a]) and max(lengths[a]) > min(lengths[b])


def test_polarity_is_a_vertical_flip_and_moves_the_centromere():
    up = render_chromosome(np.random.default_rng(2), 4, polarity=1)
    down = render_chromosome(np.random.default_rng(2), 4, polarity=0)
    assert np.array_equal(down, up[::-1])
    for k in (4, 5, 12, 18):  # clearly submetacentric: the centromere sits well off the middle
        rng = np.random.default_rng(k)
        assert all(_centromere_fraction(render_chromosome(rng, k, polarity=1)) < 0.5 for _ in range(10))
        assert all(_centromere_fraction(render_chromosome(rng, k, polarity=0)) > 0.5 for _ in range(10))


def test_manifest_layout_counts_and_polarity(dataset: Path):
    m = pd.read_csv(dataset, dtype={"case_id": str, "slide_id": str})
    assert list(m.columns) == list(MANIFEST_COLUMNS) and list(m.columns[:11]) == PKI3_COLUMNS
    assert m["case_id"].nunique() == 6 and m["slide_id"].nunique() < 6  # slides hold two cells
    for case, g in m.groupby("case_id"):
        assert g["karyotype"].nunique() == 1
        karyotype = g["karyotype"].iloc[0]
        counts = np.bincount(g["class_1to24"], minlength=25)[1:]
        assert counts.tolist() == _declared_counts(karyotype), case
        for _k, gk in g.groupby("class_1to24"):
            assert sorted(gk["copy"]) == list(range(len(gk)))
    assert (~m["karyotype"].str.match(r"^46,X[XY]$")).any()  # some abnormal cells
    assert (m["label_0to23"] == m["class_1to24"] - 1).all()
    assert set(m["polarity"]) == {0, 1}
    root = dataset.parent
    for row in m.itertuples():
        p = Path(row.path)
        assert p.parts[:3] == ("images", row.case_id, f"clase{row.class_1to24}")
        assert p.name == f"clase{row.class_1to24}_{row.copy}_{row.case_id}.png"
    # stored files match the recorded size, and the centromere agrees with the polarity label
    sub = m[m["class_1to24"].isin([4, 5, 12, 18])]
    agree = []
    for row in sub.itertuples():
        img = np.asarray(Image.open(root / row.path))
        assert img.dtype == np.uint8 and img.shape == (row.height, row.width)
        agree.append((_centromere_fraction(img) < 0.5) == (row.polarity == 1))
    assert np.mean(agree) >= 0.95


def test_abnormal_rate_extremes(tmp_path: Path):
    m = pd.read_csv(generate_karyotypes(tmp_path / "n", cases=4, seed=0, abnormal_rate=0.0, flip_rate=0.0,
                                        workers=1))
    assert m["karyotype"].isin(["46,XX", "46,XY"]).all() and (m["polarity"] == 1).all()
    assert len(m) == 4 * 46
    m = pd.read_csv(generate_karyotypes(tmp_path / "a", cases=6, seed=0, abnormal_rate=1.0, flip_rate=1.0,
                                        workers=1))
    assert not m["karyotype"].isin(["46,XX", "46,XY"]).any() and (m["polarity"] == 0).all()


def test_generation_is_deterministic_whatever_the_workers(tmp_path: Path, dataset: Path):
    again = generate_karyotypes(tmp_path / "b", cases=6, seed=3, abnormal_rate=0.5, flip_rate=0.5, workers=2)
    assert again.read_bytes() == dataset.read_bytes()
    rows = list(csv.DictReader(dataset.open()))
    for row in rows[::25]:
        assert (tmp_path / "b" / row["path"]).read_bytes() == (dataset.parent / row["path"]).read_bytes()
    other = generate_karyotypes(tmp_path / "c", cases=6, seed=4, abnormal_rate=0.5, workers=1)
    assert other.read_bytes() != dataset.read_bytes()


def test_images_round_trip_through_read_image(dataset: Path):
    from holons.data.readers import read_image

    row = pd.read_csv(dataset).iloc[0]
    path = dataset.parent / row["path"]
    pixels = read_image(path).pixels
    raw = np.asarray(Image.open(path)).astype(np.float32) / 255.0
    assert pixels.dtype == np.float32 and pixels.shape == raw.shape
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    np.testing.assert_allclose(pixels, raw, atol=1 / 255)


def test_cli_writes_manifest_and_rejects_bad_rates(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "karyotypes", "--out", str(out), "--cases", "2", "--seed", "1"]) == 0
    m = pd.read_csv(out / "manifest.csv")
    assert m["case_id"].nunique() == 2 and (out / m["path"].iloc[0]).is_file()
    assert main(["synth", "karyotypes", "--out", str(out), "--cases", "2", "--abnormal-rate", "1.5"]) == 2
    assert "abnormal rate" in capsys.readouterr().err


def test_columns_match_the_real_pki3_manifest(shared_data: Path):
    manifest = shared_data / "chromosomes" / "pki3_gband" / "manifest.csv"
    if not manifest.is_file():
        pytest.skip("pki3_gband manifest not available")
    with manifest.open() as f:
        header = next(csv.reader(f))
    assert header == PKI3_COLUMNS


# --------------------------------------------------------------------------- lab styles
_FEW = [1 if k in (1, 7, 21) else 0 for k in range(1, 25)]  # classes 1, 7 and 21, one copy each


def _pixel_digest(cell) -> str:
    h = hashlib.sha256()
    for k, copy, polarity, img in cell:
        h.update(np.array([k, copy, polarity, *img.shape], np.int64).tobytes())
        h.update(img.tobytes())
    return h.hexdigest()


def test_default_style_renders_what_the_generator_wrote_before_styles(tmp_path: Path):
    # digests computed with the generator as it was before lab styles were added
    before = {"gband": "4794f1deb48fa9d8783f43d09d3947b3846a4abbef507b28b39e9be9bb048b14",
              "qband": "e0ab172f4405e1c7da37799e7147d8c28c3f2901667f52f80d08f07009229c39"}
    for stain, digest in before.items():
        assert _pixel_digest(render_cell(np.random.default_rng(21), _FEW, style=stain)) == digest
    manifest = generate_karyotypes(tmp_path / "k", cases=1, seed=11, workers=1, progress=False)
    h = hashlib.sha256(manifest.read_bytes())
    for row in csv.DictReader(manifest.open()):
        h.update(np.asarray(Image.open(tmp_path / "k" / row["path"])).tobytes())
    assert h.hexdigest() == "e71da2539edc49d82dff24a1354a823bcfbf17cfc55a996d4a4401e303c3cab7"
    assert json.loads((tmp_path / "k" / "style.json").read_text())["style"] == "gband"


@pytest.mark.parametrize("name", list(LAB_STYLES))
def test_each_style_writes_its_documented_files(tmp_path: Path, name: str):
    style = LAB_STYLES[name]
    manifest = generate_karyotypes(tmp_path, cases=1, seed=5, workers=1, progress=False, style=name)
    m = pd.read_csv(manifest)
    assert list(m.columns) == list(MANIFEST_COLUMNS) and len(m) == 46
    recorded = json.loads((tmp_path / "style.json").read_text())
    assert recorded["style"] == name and recorded["stain"] == style.stain
    assert recorded["frame"] == (list(style.frame) if style.frame else None)
    suffix = ".jpg" if name == "jpeg" else ".png"
    borders = []
    for row in m.itertuples():
        assert row.path.endswith(suffix)
        img = np.asarray(Image.open(tmp_path / row.path))
        assert img.dtype == np.uint8 and img.shape == (row.height, row.width)
        borders.append(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])))
    if name in ("padded", "qband_padded_dim"):
        assert (m["height"] == 200).all() and (m["width"] == 100).all()
    elif name == "jpeg":
        assert (m["height"] == 242).all() and (m["width"] == 242).all()
    else:
        assert m["height"].nunique() > 5  # tight crops
    if style.stain == "qband":
        assert np.median(borders) < 20  # bright on dark
    else:
        assert np.median(borders) > 235  # dark on light


def test_padded_frames_hold_the_tight_crop_unflipped():
    tight = render_cell(np.random.default_rng(8), _FEW, style="gband")
    padded = render_cell(np.random.default_rng(8), _FEW, style="padded")
    for (k, c, pol, crop), (k2, c2, pol2, frame) in zip(tight, padded, strict=True):
        assert (k, c, pol) == (k2, c2, pol2) and frame.shape == (200, 100)
        rows, cols = np.flatnonzero((frame < 255).any(1)), np.flatnonzero((frame < 255).any(0))
        y0, x0 = rows[0] - 1, cols[0] - 1  # the tight crop keeps a 1 px background border
        assert np.array_equal(frame[y0: y0 + crop.shape[0], x0: x0 + crop.shape[1]], crop)
        assert abs(y0 - (200 - crop.shape[0]) // 2) <= 3 and abs(x0 - (100 - crop.shape[1]) // 2) <= 3


def test_a_chromosome_larger_than_the_frame_is_shrunk_to_fit():
    small = LabStyle(frame=(40, 30), frame_jitter=2)
    [(_, _, _, img)] = render_cell(np.random.default_rng(0), [1] + [0] * 23, style=small)
    assert img.shape == (40, 30)
    rows = np.flatnonzero((img < 245).any(1))
    assert 25 <= rows[-1] - rows[0] + 1 <= 36  # chromosome 1 is ~110 px long unframed


def test_dim_qband_style_is_dim_and_noisy():
    cell = render_cell(np.random.default_rng(3), _FEW, style="qband_padded_dim")
    for _k, _c, _p, img in cell:
        assert img.shape == (200, 100) and 80 <= img.max() <= 140
        border = np.concatenate([img[:5].ravel(), img[-5:].ravel()])
        assert np.median(border) < 15 and (border > 0).mean() > 0.5 and border.std() > 1.0


def test_magnified_chromosomes_are_about_1_6_times_longer():
    def median_length(style: str) -> float:
        return float(np.median([_axis_length(c[3]) for c in render_cell(np.random.default_rng(4), [1] * 24,
                                                                          style=style)]))

    assert 1.45 < median_length("magnified") / median_length("gband") < 1.75


def test_rband_reverses_the_gband_pattern():
    def profile(img: np.ndarray) -> np.ndarray:  # mean darkness per row, telomere caps left out
        fg = _foreground(img)
        rows = np.flatnonzero(fg.any(1))
        p = np.nanmean(np.where(fg, 255.0 - img, np.nan)[rows[0]: rows[-1] + 1], axis=1)
        return np.interp(np.linspace(0.12, 0.88, 48), np.linspace(0, 1, len(p)), p)

    g = render_cell(np.random.default_rng(0), [1] * 24, style="gband")
    r = render_cell(np.random.default_rng(0), [1] * 24, style="rband")
    corr = [np.corrcoef(profile(a[3]), profile(b[3]))[0, 1] for a, b in zip(g, r, strict=True)]
    assert np.median(corr) < -0.4
    assert all(np.median(b[3][[0, -1]]) == 255 for b in r)  # still dark on white


def test_jpeg_style_background_is_near_but_not_exactly_white(tmp_path: Path):
    manifest = generate_karyotypes(tmp_path, cases=1, seed=2, workers=1, progress=False, style="jpeg")
    row = pd.read_csv(manifest).iloc[0]
    img = np.asarray(Image.open(tmp_path / row["path"])).astype(int)
    rows, cols = np.flatnonzero((img < 200).any(1)), np.flatnonzero((img < 200).any(0))
    ring = img[rows[0] - 6: rows[-1] + 7, cols[0] - 6: cols[-1] + 7]
    outside = np.ones(ring.shape, bool)
    outside[4:-4, 4:-4] = False  # a few px outside the chromosome's box
    assert np.median(img[0]) == 255 and (ring[outside] < 255).any() and ring[outside].min() > 200


def test_unknown_style_is_a_clear_error(tmp_path: Path):
    with pytest.raises(HolonsError, match="unknown style 'nope'.*gband"):
        generate_karyotypes(tmp_path, cases=1, style="nope")
    with pytest.raises(HolonsError, match="unknown style"):
        render_cell(np.random.default_rng(0), _FEW, style="nope")
    with pytest.raises(HolonsError, match="jpeg_quality"):
        LabStyle(jpeg_quality=0)
    # a LabStyle object is recorded as custom
    generate_karyotypes(tmp_path / "c", cases=1, workers=1, progress=False,
                        style=LabStyle(stain="qband", magnification=0.5))
    assert json.loads((tmp_path / "c" / "style.json").read_text())["style"] == "custom"


def test_cli_style_option(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "karyotypes", "--out", str(out), "--cases", "1", "--style", "jpeg"]) == 0
    m = pd.read_csv(out / "manifest.csv")
    assert m["path"].str.endswith(".jpg").all() and (out / m["path"].iloc[0]).is_file()
    assert json.loads((out / "style.json").read_text())["jpeg_quality"] == 75
    capsys.readouterr()
    assert main(["synth", "karyotypes", "--out", str(out), "--cases", "0", "--style", "padded"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cases must be at least 1" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["synth", "karyotypes", "--out", str(out), "--style", "nope"])
    with pytest.raises(SystemExit):
        main(["synth", "karyotypes", "--help"])
    help_text = capsys.readouterr().out
    for name, style in LAB_STYLES.items():  # the CLI's own list stays in step with LAB_STYLES
        assert f"  {name:<18}{style.summary}" in help_text
