"""The four-step Varifocal schedule as phases, and which heads it trains (see :mod:`.train`)."""

from __future__ import annotations

from dataclasses import dataclass

from holons.errors import ConfigError
from holons.finetune.karyotype.config import KaryotypeConfig


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    trains: tuple[str, ...]
    """Module attribute names whose parameters this phase updates."""
    loss: str
    """``g``, ``box``, ``l`` or ``fusion``."""


def schedule(cfg: KaryotypeConfig) -> list[Phase]:
    """The phases of ``cfg`` in order (see the module doc), empty ones dropped."""
    t, variant = cfg.train, cfg.model.variant
    phases = [Phase("gnet", t.gnet_epochs, ("g_backbone", "g_type", "g_polarity"), "g")]
    if variant == "varifocal":
        phases.append(Phase("localizer", t.localizer_epochs, ("localizer",), "box"))
    if variant != "g_only":
        for r in range(1, t.lnet_rounds + 1):
            local = {"sgma_parts": ("part_attention",), "pdisconet_parts": ("l_parts",)}.get(variant, ())
            trains = ("l_backbone", "l_type", "l_polarity", *local)
            phases.append(Phase(f"lnet_{r}", t.lnet_epochs, trains, "l"))
            if variant == "varifocal":
                phases.append(Phase(f"locrefine_{r}", t.localizer_refine_epochs, ("localizer",), "l"))
        phases.append(Phase("fusion", t.fusion_epochs, ("fusion_type", "fusion_polarity"), "fusion"))
    return [p for p in phases if p.epochs > 0]


def trained_heads(cfg: KaryotypeConfig) -> list[str]:
    """The heads the schedule trains, in the order :func:`best_head` prefers on a tie."""
    names = {p.name.split("_")[0] for p in schedule(cfg)}
    trained = {"g": "gnet" in names, "l": "lnet" in names, "fusion": "fusion" in names}
    trained["mean"] = trained["g"] and trained["l"]
    return [h for h in ("mean", "fusion", "l", "g") if trained[h]]


def final_head(cfg: KaryotypeConfig) -> str:
    """The head whose predictions the trained model reports: ``model.output_head``, or with ``auto``
    fusion, else L-Net, else G-Net; ``best`` is decided after training on the validation split
    (:func:`best_head`). A head whose steps the schedule does not train is refused."""
    names = {p.name.split("_")[0] for p in schedule(cfg)}
    heads = trained_heads(cfg)
    head = cfg.model.output_head
    if head == "auto":
        return "fusion" if "fusion" in heads else "l" if "l" in heads else "g"
    if head == "best":
        return head
    if head not in heads:
        raise ConfigError(f"model.output_head={head}: the schedule does not train it (variant "
                          f"{cfg.model.variant}, steps {', '.join(sorted(names)) or 'none'})")
    return head
