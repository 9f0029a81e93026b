"""Varifocal G-Net / L-Net (after Varifocal-Net, IEEE TMI 2019), on holons or timm backbones.

- G-Net: a backbone on the whole canvas (``input_size``) with a type head (24) and a polarity
  head (2).
- Localizer: G-Net's pooled features -> MLP -> three sigmoids, mapped to a box that always stays
  inside the canvas: centre (x, y) in [1/4, 3/4] of the side, half-size in [1/8, 1/4] (side in
  [1/4, 1/2]). Coordinates are fractions of the canvas, x to the right, y down.
- Varifocal zoom: the box is cropped from the source image (``zoom_source_size``) and resampled
  to the L-Net input (half the G-Net input). The forward pass is the hard crop; the gradient to
  the three box numbers flows through a soft logistic box mask (steepness ``k`` per source pixel)
  as a straight-through term: ``out = hard + (soft - soft.detach())``, or, with
  ``box_gradient: sampling``, straight through the bilinear crop's coordinates.
- L-Net: a second backbone on the zoomed crop, with its own type and polarity heads (used while
  it trains on its own, step 3).
- Fusion: concatenated G and L features -> two MLPs (``fusion_hidden``) for type and polarity.

Variants: ``varifocal`` (all of the above), ``g_only`` (no L-Net), ``l_whole`` (the L-Net sees the
whole canvas at the L-Net size instead of the learned crop; an ablation), ``sgma_parts`` and
``pdisconet_parts`` (part-based local branches instead of the zoom, see
:mod:`~holons.finetune.karyotype.part_branches`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from holons.errors import ConfigError
from holons.finetune.karyotype.config import KaryotypeModelConfig
from holons.finetune.karyotype.data import NUM_TYPES
from holons.finetune.karyotype.part_branches import AttentionCrops, DiscoveredParts
from holons.ssl.backbone import create_backbone

CENTRE_RANGE = (0.25, 0.75)
HALF_RANGE = (0.125, 0.25)


def bound_box(raw: torch.Tensor) -> torch.Tensor:
    """Three unbounded numbers per sample -> (cx, cy, half) inside the canvas (see module doc)."""
    s = torch.sigmoid(raw)
    centre = CENTRE_RANGE[0] + (CENTRE_RANGE[1] - CENTRE_RANGE[0]) * s[..., :2]
    half = HALF_RANGE[0] + (HALF_RANGE[1] - HALF_RANGE[0]) * s[..., 2:3]
    return torch.cat([centre, half], dim=-1)


def box_targets(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """The centred square covering each chromosome (foreground ``> threshold``), as a bounded box.

    ``images`` N x 1 x H x W; returns N x 3 (cx, cy, half) clamped to the localizer's range, the
    smooth-L1 target of the localizer's pre-training (step 2).
    """
    n, _, h, w = images.shape
    fg = images[:, 0] > threshold
    rows, cols = fg.any(2), fg.any(1)
    ys = torch.arange(h, device=images.device, dtype=torch.float32)
    xs = torch.arange(w, device=images.device, dtype=torch.float32)
    big = torch.tensor(1e9, device=images.device)

    def extent(hit: torch.Tensor, pos: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.where(hit, pos, big).amin(1)
        hi = torch.where(hit, pos + 1, -big).amax(1)
        empty = ~hit.any(1)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.full_like(hi, size), hi)
        return lo / size, hi / size

    x0, x1 = extent(cols, xs, w)
    y0, y1 = extent(rows, ys, h)
    half = torch.maximum(x1 - x0, y1 - y0) / 2
    box = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, half], dim=1)
    lo = torch.tensor([CENTRE_RANGE[0], CENTRE_RANGE[0], HALF_RANGE[0]], device=images.device)
    hi = torch.tensor([CENTRE_RANGE[1], CENTRE_RANGE[1], HALF_RANGE[1]], device=images.device)
    return torch.minimum(torch.maximum(box, lo), hi)


def box_mask(box: torch.Tensor, height: int, width: int, steepness: float) -> torch.Tensor:
    """Soft logistic mask of each box on an H x W pixel grid, N x 1 x H x W (k per pixel)."""
    cx, cy, half = box[:, 0:1], box[:, 1:2], box[:, 2:3]
    px = (torch.arange(width, device=box.device, dtype=box.dtype) + 0.5)[None] / width
    py = (torch.arange(height, device=box.device, dtype=box.dtype) + 0.5)[None] / height
    kx, ky = steepness * width, steepness * height
    mx = torch.sigmoid(kx * (px - (cx - half))) * torch.sigmoid(kx * ((cx + half) - px))
    my = torch.sigmoid(ky * (py - (cy - half))) * torch.sigmoid(ky * ((cy + half) - py))
    return (my[:, :, None] * mx[:, None, :])[:, None]


def _crop(images: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    n, c = images.shape[:2]
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 2 * box[:, 2]
    theta[:, 0, 2] = 2 * box[:, 0] - 1
    theta[:, 1, 2] = 2 * box[:, 1] - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def varifocal_zoom(images: torch.Tensor, box: torch.Tensor, size: int,
                   steepness: float = 10.0, gradient: str = "mask") -> torch.Tensor:
    """Crop ``box`` (N x 3: cx, cy, half; canvas fractions) from ``images`` to ``size x size``.

    Forward: the hard bilinear crop. Backward (``gradient``): ``mask``, the gradient to ``box`` goes
    through the soft logistic box mask (the crop of ``images * mask`` at the same, detached, place);
    ``sampling``, the exact gradient of the bilinear crop with respect to its coordinates.
    """
    if gradient == "sampling":
        return _crop(images, box, size)
    fixed = box.detach()
    hard = _crop(images, fixed, size)
    if not box.requires_grad:
        return hard
    soft = _crop(images * box_mask(box, images.shape[-2], images.shape[-1], steepness), fixed, size)
    return hard + (soft - soft.detach())


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class VarifocalNet(nn.Module):
    """G-Net, localizer, L-Net and fusion heads; ``forward`` returns a dict of what was asked for."""

    def __init__(self, cfg: KaryotypeModelConfig, input_size: int, *, in_chans: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_size = int(input_size)
        self.l_size = self.input_size // 2
        kw = {"drop_rate": cfg.drop_rate} if cfg.drop_rate else {}
        self.g_backbone = create_backbone(cfg.g_backbone, in_chans=in_chans,
                                          pretrained_dir=cfg.g_pretrained_dir, **kw)
        # Foundation weights see inputs normalized as in pretraining (recorded in the export); a
        # randomly initialised backbone sees the [0, 1] images as they are ([mean, std] = [0, 1]).
        self.register_buffer("g_norm", self._norm(self.g_backbone, cfg.g_pretrained_dir))
        d = self._probe(self.g_backbone, self.input_size, "G-Net")
        self.g_type = nn.Linear(d, NUM_TYPES)
        self.g_polarity = nn.Linear(d, 2)
        self.has_lnet = cfg.variant != "g_only"
        self.has_localizer = cfg.variant == "varifocal"
        if self.has_localizer:
            self.localizer = _mlp(d, cfg.localizer_hidden, 3)
            nn.init.zeros_(self.localizer[-1].weight)
            nn.init.zeros_(self.localizer[-1].bias)  # starts at the centre, half-size 3/16
        if cfg.variant == "sgma_parts":
            channels = self._probe(self.g_backbone, self.input_size, "G-Net", dense=True)
            self.part_attention = AttentionCrops(channels, cfg.parts,
                                                 cfg.part_crop_fraction, cfg.part_loss_weight)
        if self.has_lnet:
            self.l_backbone = create_backbone(cfg.l_backbone, in_chans=in_chans,
                                              pretrained_dir=cfg.l_pretrained_dir, **kw)
            self.register_buffer("l_norm", self._norm(self.l_backbone, cfg.l_pretrained_dir))
            if cfg.variant == "pdisconet_parts":  # parts need the detail of the full canvas
                self.l_size = self.input_size
                dl = self._probe(self.l_backbone, self.l_size, "L-Net", dense=True)
                self.l_parts = DiscoveredParts(dl, cfg.parts, cfg.part_dropout, cfg.part_loss_weight)
            else:
                dl = self._probe(self.l_backbone, self.l_size, "L-Net")
            self.l_type = nn.Linear(dl, NUM_TYPES)
            self.l_polarity = nn.Linear(dl, 2)
            self.fusion_type = _mlp(d + dl, cfg.fusion_hidden, NUM_TYPES)
            self.fusion_polarity = _mlp(d + dl, cfg.fusion_hidden, 2)

    @staticmethod
    def _norm(backbone: nn.Module, pretrained_dir: str | None) -> torch.Tensor:
        stats = backbone.recorded_input_stats() if pretrained_dir else None
        return torch.tensor(stats or (0.0, 1.0), dtype=torch.float32)

    @staticmethod
    def _normalized(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return (x - norm[0]) / norm[1]

    @staticmethod
    def _probe(backbone: nn.Module, size: int, what: str, *, dense: bool = False) -> int:
        """The pooled feature size, from one dummy forward (some timm models, e.g. MobileNetV3, pool
        through a head wider than ``num_features``); with ``dense``, the channels of the last feature
        map, which a part branch needs at least 2 x 2 positions of to choose among. Fails early, in
        words, when ``size`` is too small for the backbone."""
        was = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(1, backbone.in_chans, size, size)
                if not dense:
                    return int(backbone(x).shape[-1])
                feature_map = backbone.forward_pooled_dense(x)[1]
        except RuntimeError as e:
            raise ConfigError(
                f"{what} input of {size} px is too small for backbone {backbone.name!r} "
                f"(the L-Net sees half of data.input_size); use a larger data.input_size"
            ) from e
        finally:
            backbone.train(was)
        c, h, w = feature_map.shape[-3:]
        if h * w < 4:
            raise ConfigError(f"{what} feature map of {size} px input is {h} x {w}: too small for parts; "
                              "use a larger data.input_size")
        return int(c)

    def g_input(self, source: torch.Tensor) -> torch.Tensor:
        if source.shape[-1] == self.input_size:
            return source
        return F.interpolate(source, size=(self.input_size, self.input_size), mode="area")

    def l_input(self, source: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        if box is None:  # l_whole: the whole canvas at the L-Net size
            return F.interpolate(source, size=(self.l_size, self.l_size), mode="area")
        return varifocal_zoom(source, box, self.l_size, self.cfg.mask_steepness, self.cfg.box_gradient)

    def forward(self, source: torch.Tensor, parts: tuple[str, ...] = ("g", "l", "fusion")) -> dict:
        """``source`` N x 1 x S x S (the zoom source; G sees it resized to ``input_size``).

        ``parts``: ``g`` (G logits), ``box``, ``l`` (L logits; implies box), ``fusion`` (implies l).
        """
        out: dict[str, torch.Tensor] = {}
        need_l = self.has_lnet and ("l" in parts or "fusion" in parts)
        g_in = self._normalized(self.g_input(source), self.g_norm)
        if need_l and hasattr(self, "part_attention"):
            g_feat, g_dense = self.g_backbone.forward_pooled_dense(g_in)
        else:
            g_feat, g_dense = self.g_backbone(g_in), None
        out["g_feat"] = g_feat
        if "g" in parts:
            out["g_type"], out["g_polarity"] = self.g_type(g_feat), self.g_polarity(g_feat)
        if self.has_localizer and ("box" in parts or need_l):
            out["box"] = bound_box(self.localizer(g_feat))
        if need_l:
            l_feat = self._local_features(source, out, g_dense)
            out["l_feat"] = l_feat
            out["l_type"], out["l_polarity"] = self.l_type(l_feat), self.l_polarity(l_feat)
            if "fusion" in parts:
                both = torch.cat([g_feat, l_feat], dim=1)
                out["type"], out["polarity"] = self.fusion_type(both), self.fusion_polarity(both)
        return out

    def _local_features(self, source: torch.Tensor, out: dict, g_dense: torch.Tensor | None) -> torch.Tensor:
        """The L-Net's pooled feature of the variant's local view; a part branch also puts its maps into
        ``out``, and its auxiliary loss (``part_loss``) while it trains."""
        if g_dense is not None:  # sgma_parts: the mean feature of the attention crops
            maps = self.part_attention.maps(g_dense)
            crops = self.part_attention.crops(source, maps, self.l_size)
            feats = self.l_backbone(self._normalized(crops, self.l_norm))
            out["part_maps"] = maps
            if self.part_attention.training:
                out["part_loss"] = self.part_attention.loss(maps)
            return feats.view(len(source), -1, feats.shape[-1]).mean(dim=1)
        if hasattr(self, "l_parts"):  # pdisconet_parts: features pooled over the discovered parts
            whole = self._normalized(self.g_input(source), self.l_norm)
            _, dense = self.l_backbone.forward_pooled_dense(whole)
            feature, maps, vectors = self.l_parts(dense)
            out["part_maps"] = maps
            if self.l_parts.training:
                out["part_loss"] = self.l_parts.loss(maps, vectors)
            return feature
        return self.l_backbone(self._normalized(self.l_input(source, out.get("box")), self.l_norm))

    @torch.no_grad()
    def predict_logits(self, source: torch.Tensor, head: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Type and polarity logits of the chosen head: ``g``, ``l``, ``fusion``, or ``mean`` (the
        average of the G and L heads' probabilities, as log-probabilities: an ensemble that needs no
        training, against which the learned fusion can be judged)."""
        type_logits, polarity_logits, _ = self._head_outputs(source, head, features=False)
        return type_logits, polarity_logits

    @torch.no_grad()
    def predict_features(self, source: torch.Tensor,
                         head: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`predict_logits` plus the pooled features ``N x D``: G-Net's, concatenated with the
        L-Net's when the model has one (what the learned per-cell dispatcher reads). The logits are
        those of :meth:`predict_logits`, computed the same way."""
        type_logits, polarity_logits, feats = self._head_outputs(source, head, features=True)
        assert feats is not None
        return type_logits, polarity_logits, feats

    def _head_outputs(self, source: torch.Tensor, head: str,
                      features: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        parts = {"g": ("g",), "mean": ("g", "l"), "fusion": ("l", "fusion")}.get(head, ("l",))
        if features and self.has_lnet and "l" not in parts:
            parts += ("l",)
        out = self(source, parts)
        if head == "g":
            logits = out["g_type"], out["g_polarity"]
        elif head == "mean":
            logits = tuple(torch.logsumexp(torch.stack([F.log_softmax(out[f"g_{k}"], 1),
                                                        F.log_softmax(out[f"l_{k}"], 1)]), 0) - math.log(2.0)
                           for k in ("type", "polarity"))
        elif head == "fusion":
            logits = out["type"], out["polarity"]
        else:
            logits = out["l_type"], out["l_polarity"]
        feats = None
        if features:
            feats = torch.cat([out["g_feat"], out["l_feat"]], 1) if self.has_lnet else out["g_feat"]
        return logits[0], logits[1], feats
