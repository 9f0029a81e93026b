"""Pictures of the built-in synthetic data for the README: ``python docs/make_figures.py``."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent


def karyotype_figure(out_png: str | Path) -> Path:
    """A synthetic G-band cell (47,XY,+21) and a Q-band cell (46,XX) as karyograms, and one
    chromosome per group stored at polarity 1 (p arm up) and polarity 0 (flipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from holons.data.synthetic.chromosomes import render_chromosome
    from holons.data.synthetic.karyotypes import karyogram, parse_karyotype, render_cell

    rng = np.random.default_rng(21)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1, 0.55]})
    for ax, (karyotype, stain) in zip(axes[:2], (("47,XY,+21", "gband"), ("46,XX", "qband")), strict=True):
        cell = render_cell(rng, parse_karyotype(karyotype), style=stain, flip_rate=0.0)
        canvas, labels = karyogram([(k, img) for k, _copy, _pol, img in cell], stain=stain)
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
        colour = "black" if stain == "gband" else "white"
        for k, (x, y) in labels.items():
            name = {23: "X", 24: "Y"}.get(k, str(k))
            ax.text(x, y, name, ha="center", va="center", fontsize=7, color=colour)
        ax.set_title(f"{karyotype}  ({'G' if stain == 'gband' else 'Q'}-band style)")
        ax.axis("off")
    pairs = []
    for k in (1, 4, 9, 13, 18, 23):
        seed = int(rng.integers(1 << 31))
        pairs.append([render_chromosome(np.random.default_rng(seed), k, polarity=p) for p in (1, 0)])
    h = max(im.shape[0] for pair in pairs for im in pair) + 6
    columns = []
    for pair in pairs:
        w = max(im.shape[1] for im in pair) + 6
        col = np.full((2 * h, w), 255, np.uint8)
        for i, im in enumerate(pair):
            col[i * h + 3: i * h + 3 + im.shape[0], 3: 3 + im.shape[1]] = im
        columns.append(col)
    strip = np.concatenate(columns, axis=1)
    axes[2].imshow(strip, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    x = 0
    for k, col in zip((1, 4, 9, 13, 18, "X"), columns, strict=True):
        axes[2].text(x + col.shape[1] / 2, -4, str(k), ha="center", va="bottom", fontsize=8)
        x += col.shape[1]
    axes[2].set_yticks([h / 2, 1.5 * h], ["polarity 1\n(q down)", "polarity 0\n(flipped)"], fontsize=8)
    axes[2].set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        axes[2].spines[side].set_visible(False)
    axes[2].set_title("stored orientation", pad=14)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


def phantom_figure(out_png: str | Path, size: int = 320) -> Path:
    """Four chest phantoms (normal, cardiomegaly, nodule, effusion): the radiograph above, and below
    it the five masks with their landmarks (point 0 of each contour ringed) and the recorded findings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from holons.data.synthetic.chest_anatomy import sample_patient, vary_acquisition
    from holons.data.synthetic.chest_params import STRUCTURES
    from holons.data.synthetic.chest_render import render_phantom

    colours = {"right_lung": "tab:red", "left_lung": "tab:blue", "heart": "tab:green",
               "right_clavicle": "gold", "left_clavicle": "tab:purple"}
    def only(p, finding: str) -> bool:
        """``p`` has exactly ``finding`` (none for "normal"), and a nodule or effusion big enough to see."""
        found = {"cardiomegaly": p.ctr > 0.5, "nodule": p.nodule is not None,
                 "effusion": p.effusion_side is not None}
        big = {"nodule": found["nodule"] and p.nodule.diameter_mm > 15, "effusion": p.effusion_height > 0.08}
        return all(found[k] == (k == finding) for k in found) and big.get(finding, True)

    wanted = {name: functools.partial(only, finding=name)
              for name in ("normal", "cardiomegaly", "nodule", "effusion")}
    picked = {}
    seed = 0
    while len(picked) < len(wanted):
        patient = sample_patient(np.random.default_rng([seed, 1]), findings_rate=0.0 if not picked else 1.0)
        for name, ok in wanted.items():
            if name not in picked and ok(patient):
                picked[name] = (seed, patient)
                break
        seed += 1

    fig, axes = plt.subplots(2, len(wanted), figsize=(4 * len(wanted), 8.4))
    for col, name in enumerate(wanted):
        seed, patient = picked[name]
        rng = np.random.default_rng([seed, 2])
        ph = render_phantom(rng, size, vary_acquisition(rng, patient))
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(ph.image, cmap="gray", vmin=0, vmax=1)
        overlay = np.repeat(ph.image[..., None], 3, axis=2) * 0.8
        for s in STRUCTURES:
            overlay[ph.masks[s]] = 0.55 * overlay[ph.masks[s]] + 0.45 * np.array(to_rgb(colours[s]))
        bottom.imshow(np.clip(overlay, 0, 1))
        for s in STRUCTURES:
            pts = ph.landmarks[s]
            bottom.plot(pts[:, 0], pts[:, 1], ".", ms=2.5, color="white")
            bottom.plot(pts[0, 0], pts[0, 1], "o", ms=5, mfc="none", mec=colours[s], mew=1.2)
        f = ph.findings
        notes = [f"CTR {f['ctr']:.2f}" + (" (cardiomegaly)" if f["cardiomegaly"] else "")]
        if f["nodule"]:
            r = f["nodule_size"] / 2 + 4
            for ax in (top, bottom):
                ax.add_patch(plt.Circle((f["nodule_x"], f["nodule_y"]), r, fill=False, color="orange"))
            notes.append(f"nodule {f['nodule_size_mm']:.0f} mm, {f['nodule_side']} lung")
        if f["effusion"]:
            notes.append(f"effusion, {f['effusion_side']} side")
        top.set_title(f"{name}: " + "; ".join(notes), fontsize=9)
        bottom.set_title(f"rotation {ph.params.rotation_deg:+.1f} deg, masks + landmarks", fontsize=9)
        for ax in (top, bottom):
            ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[s], lw=6, label=s.replace("_", " ")) for s in STRUCTURES]
    fig.legend(handles=handles, loc="lower center", ncol=len(STRUCTURES), frameon=False, fontsize=9)
    fig.suptitle("Synthetic PA chest phantoms (patient's right on the image left, bright = dense)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


if __name__ == "__main__":
    print(phantom_figure(DOCS / "phantoms.png"))
    print(karyotype_figure(DOCS / "karyotype.png"))
