"""A picture of several localizers' maps side by side: a few held-out images with a finding (rows), the
image and each model's map (columns), the true boxes in green and each model's predicted box in red, all
in the source image's geometry. For a paper figure or a quick look after ``holons evaluate localize``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from holons.data.readers import read_image
from holons.data.weak_labels import load_weak_label_set
from holons.errors import HolonsError
from holons.finetune.localize.folder import load_localizer
from holons.finetune.localize.predict import predict_maps

__all__ = ["draw_localization_maps"]


def draw_localization_maps(models: dict[str, str | Path], data: str | Path, out: str | Path, *,
                           finding: str | None = None, split: str | None = None, images: int = 4,
                           device: str = "auto") -> Path:
    """Write the PNG ``out`` for the localizer folders ``models`` (name -> folder) on the first ``images``
    images of ``split`` (default: the set's held-out split) that have a true box of ``finding`` (default:
    the one the first model was trained on); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not models:
        raise HolonsError("no model to draw: give at least one NAME=FOLDER")
    if finding is None:
        finding = load_localizer(next(iter(models.values()))).meta.get("config", {}).get("finding")
    dataset = load_weak_label_set(data, finding)
    chosen = [i for i in dataset.indices(split or dataset.held_out_split()) if len(dataset.boxes[i])][:images]
    if not chosen:
        raise HolonsError(f"{data}: no image of the split has a true box to draw")
    paths = [dataset.paths[i] for i in chosen]
    predictions = {name: predict_maps(folder, paths, device=device) for name, folder in models.items()}
    columns = len(models) + 1
    fig, axes = plt.subplots(len(chosen), columns, figsize=(1.9 * columns, 1.9 * len(chosen)), squeeze=False)
    for row, i in enumerate(chosen):
        image = read_image(dataset.paths[i]).pixels
        for col, name in enumerate(["image", *models]):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray")
            if name != "image":
                ax.imshow(predictions[name].maps[row], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                x0, y0, x1, y1 = predictions[name].boxes[row]
                if np.isfinite(x0):
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=1))
            for x0, y0, x1, y1 in dataset.boxes[i]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
