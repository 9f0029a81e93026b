"""Chromosome preprocessing: stain decided per image, foreground not file, intensity, canvas, scale."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from holons.data.readers import read_image
from holons.data.synthetic.chromosomes import render_chromosome
from holons.finetune.karyotype.data import Crops, fit_preprocessing
from holons.finetune.karyotype.preprocess import (
    ChromosomeImageError,
    cell_scale_factors,
    choose_canvas,
    chromosome_crop,
    decide_stain,
    network_input,
    place_on_canvas,
    reference_length,
)


def _chromosomes(stain: str, n: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render_chromosome(rng, 1 + k % 24, stain=stain) / 255.0 for k in range(n)]


def _frame(x: np.ndarray, shape=(200, 100), fill: float = 0.0, offset=(0, 0)) -> np.ndarray:
    """``x`` in a fixed padded frame (as BioImLab / karyonet files are)."""
    out = np.full(shape, fill, np.float32)
    h, w = min(x.shape[0], shape[0]), min(x.shape[1], shape[1])
    y0, x0 = (shape[0] - h) // 2 + offset[0], (shape[1] - w) // 2 + offset[1]
    out[y0:y0 + h, x0:x0 + w] = x[:h, :w]
    return out


def _dim_noisy(x: np.ndarray, rng: np.random.Generator, peak: float = 110 / 255) -> np.ndarray:
    """Q-band as a dim camera gives it: brightest ~110 of 255, noise on the padding too."""
    return np.clip(x * peak / max(x.max(), 1e-6) + rng.normal(0.01, 0.01, x.shape), 0, 1).astype(np.float32)


def test_stain_is_decided_per_image_on_every_synthetic_style():
    rng = np.random.default_rng(1)
    g, q = _chromosomes("gband"), _chromosomes("qband")
    assert all(decide_stain(x) == "gband" for x in g)
    assert all(decide_stain(x) == "qband" for x in q)
    assert all(decide_stain(_frame(x, fill=1.0)) == "gband" for x in g)            # padded white frames
    assert all(decide_stain(_dim_noisy(_frame(x), rng)) == "qband" for x in q)     # dim, noisy, padded
    assert decide_stain(np.ones((5, 5))) == "gband" and decide_stain(np.zeros((5, 5))) == "qband"
    with pytest.raises(ChromosomeImageError):
        decide_stain(np.zeros((2, 9)))


def test_crop_follows_the_chromosome_not_the_file():
    """The same chromosome tight, in a white padded frame off centre, and as dim noisy Q-band in a
    black frame gives (almost) the same network input."""
    rng = np.random.default_rng(2)
    g = render_chromosome(np.random.default_rng(4), 4, stain="gband") / 255.0
    q = render_chromosome(np.random.default_rng(4), 4, stain="qband") / 255.0
    tight, _ = network_input(chromosome_crop(g, "auto"), 136, 64)
    padded, _ = network_input(chromosome_crop(_frame(g, fill=1.0, offset=(17, -9)), "auto"), 136, 64)
    dim, _ = network_input(chromosome_crop(_dim_noisy(_frame(q), rng), "auto"), 136, 64)
    assert np.abs(tight - padded).max() < 0.01
    assert chromosome_crop(_dim_noisy(_frame(q), rng), "qband").shape[0] == pytest.approx(g.shape[0], abs=3)
    # intensity is stretched to the chromosome's own range: the dim copy reaches the bright one's level
    assert np.abs(tight - dim).mean() < 0.03 and dim.max() > 0.9
    # outside the chromosome the input is exactly 0 (no camera noise, no JPEG halo)
    assert (dim[:, :8] == 0).all() and (dim[:8] == 0).all()


def test_specks_and_an_empty_image():
    g = render_chromosome(np.random.default_rng(3), 9, stain="gband") / 255.0
    framed = _frame(g, fill=1.0)
    framed[3:5, 3:5] = 0.0  # a dust speck far from the chromosome
    assert chromosome_crop(framed, "gband").shape == chromosome_crop(g, "gband").shape
    blank = chromosome_crop(np.ones((30, 20)), "gband")  # nothing in it: kept whole, not lost
    assert blank.shape == (30, 20)


def test_canvas_from_a_high_percentile_of_lengths():
    lengths = [40.0] * 198 + [300.0, 310.0]  # two outliers (say, overlapping chromosomes)
    assert choose_canvas(lengths, 99.0) == 48
    assert choose_canvas(lengths, 98.0) == 40
    assert choose_canvas(lengths, 100.0) == 312
    with pytest.raises(ChromosomeImageError):
        choose_canvas([])
    big, shrunk = place_on_canvas(np.ones((96, 24), np.float32), 48)
    assert shrunk and np.flatnonzero(big.max(1) > 0.5).size == 48


def test_fit_preprocessing_chooses_the_canvas_from_chromosomes_and_counts_outliers():
    crops = [np.ones((int(n), 10), np.uint8) for n in [50] * 199 + [400]]
    table = pd.DataFrame({"case_id": ["c"] * 200, "label": 0, "polarity": 1})
    prep = fit_preprocessing(Crops(table, crops), stain="auto")
    assert prep.canvas == 56 and prep.scale == "none"
    assert fit_preprocessing(Crops(table, crops), stain="auto", canvas=64).canvas == 64


def test_cell_scale_normalization_moves_between_magnifications():
    rng = np.random.default_rng(5)
    lengths = rng.uniform(20, 120, 46)
    cases = ["a"] * 46 + ["b"] * 46 + ["small"] * 3
    both = np.concatenate([lengths, 1.6 * lengths, [50.0, 60.0, 70.0]])
    ref = reference_length(both[:92], cases[:92])
    factors = cell_scale_factors(both, cases, ref)
    assert np.allclose(both[:46] * factors[:46], both[46:92] * factors[46:92])  # same scale after
    assert np.allclose(factors[92:], 1.0)  # too few chromosomes for a median: untouched
    # relative lengths inside a cell are kept
    assert np.allclose((both * factors)[:46] / np.median((both * factors)[:46]), lengths / np.median(lengths))


def test_stain_is_right_on_every_real_set(shared_data):
    root = shared_data / "chromosomes"
    for name, want in (("pki3_gband", "gband"), ("karyonet_sample", "gband")):
        manifest = pd.read_csv(root / name / "manifest.csv")
        for path in manifest.sample(60, random_state=0)["path"]:
            x = read_image(root / name / path).pixels
            assert decide_stain(x) == want, path
            assert decide_stain(1.0 - x) == "qband", path  # the same chromosome as bright-on-dark
            crop = chromosome_crop(x, "auto")
            assert crop.max() > 0.9 and crop.shape[0] <= x.shape[0]
