"""All views of a batch for Adam-v2-style pretraining, in a few batched resampling calls.

For cached images ``(B, C, H, W)`` in [0, 1] and a granularity level, :class:`ViewGenerator`
draws the whole W, one global crop, nested local crops (and/or part-local crops) and the k x k
parts, resamples each group of equal output size with one ``grid_sample`` over the batch,
optionally mixes them with a partner sample (CutMix), then augments intensities per view.
Everything stays on the input's device and is reproducible from an explicit ``torch.Generator``.

Layout: view groups are ``(B, V, C, S, S)``, sample-major; boxes are ``(B, V, 4)`` in image pixel
coordinates ``(x0, y0, x1, y1)`` (pixel i covers [i, i + 1)), before rotation and flip.
Intensity normalization (mean / std) is left to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from holons.anatomy._random import uniform
from holons.anatomy.crops import (
    global_crop_boxes,
    nested_local_boxes,
    part_local_boxes,
    sample_views,
    view_grid,
)
from holons.anatomy.decomposer import part_boxes, part_cells, whole_boxes
from holons.anatomy.intensity import IntensityConfig, augment_intensity, sample_angles
from holons.anatomy.mixing import CutMixConfig, cutmix, sample_part_swaps, sample_partner
from holons.errors import ConfigError, HolonsError

Mode = Literal["part_whole", "localizability"]


@dataclass
class ViewConfig:
    """How views are cut from a batch (defaults: the paper's recipe at 224 / 96 px).

    Flip policy: ``hflip`` is off by default (and in every shipped pretraining config): chest
    anatomy is not left-right symmetric (heart, aortic knob, gastric bubble), so a mirrored
    radiograph is not a plausible image of the same anatomy and would teach the model that left
    and right are interchangeable (``holons evaluate laterality`` measures what a model keeps).
    When on, each student crop is mirrored with probability ``hflip_prob`` (the whole and the
    parts never are).
    """

    global_size: int = 224
    local_size: int = 96
    k: int = 2
    """Parts per side: the whole is cut into k x k parts in raster order."""
    level: int = 0
    """Default granularity level (a call may pass another)."""
    margin: float = 0.05
    """Distance of the whole from the image border at levels >= 1, as a fraction of the image side."""
    n_global: int = 1
    global_scale: tuple[float, float] = (0.8, 1.0)
    """Area of a global crop as a fraction of the whole."""
    global_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    n_local: int = 8
    local_crops: Literal["nested", "part_local", "both"] = "nested"
    local_scale: tuple[float, float] = (0.05, 0.8)
    """Nested local crops' areas span these fractions of W, split into ``n_local`` sorted bands."""
    local_tall_aspect: tuple[float, float] = (2 / 3, 1.0)
    local_wide_aspect: tuple[float, float] = (1.0, 3 / 2)
    local_position_jitter: float = 1.0
    """1: local crops anywhere inside W; 0: all centred on W's centre."""
    n_part_local: int = 2
    """Part-local crops per part."""
    part_local_scale: tuple[float, float] = (0.25, 0.8)
    part_local_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_degrees: float = 10.0
    """Student crops rotate by up to this many degrees."""
    warmup_rotation_degrees: float = 30.0
    """Rotation in the localizability-only warm-up."""
    warmup_n_global: int = 2
    rotate_whole_and_parts: bool = False
    """Also rotate W and its parts (off: they stay axis-aligned so the parts tile the whole)."""
    hflip: bool = False
    hflip_prob: float = 0.5
    padding_mode: Literal["zeros", "border", "reflection"] = "zeros"
    """What rotated views see outside the image."""
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    cutmix: CutMixConfig = field(default_factory=CutMixConfig)

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size", "k", "n_global", "warmup_n_global"):
            if getattr(self, name) < 1:
                raise ConfigError(f"views.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_local", "n_part_local", "level"):
            if getattr(self, name) < 0:
                raise ConfigError(f"views.{name} must be >= 0, got {getattr(self, name)}")
        if self.local_crops not in ("nested", "part_local", "both"):
            raise ConfigError(f"views.local_crops must be nested, part_local or both: {self.local_crops!r}")
        for name in ("global_scale", "local_scale", "part_local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"views.{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        for name in ("global_aspect", "local_tall_aspect", "local_wide_aspect", "part_local_aspect"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"views.{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if not 0 <= self.margin < 0.5:
            raise ConfigError(f"views.margin must be in [0, 0.5), got {self.margin}")
        if not 0 <= self.hflip_prob <= 1 or not 0 <= self.local_position_jitter <= 1:
            raise ConfigError("views.hflip_prob and views.local_position_jitter must be in [0, 1]")
        if isinstance(self.intensity, dict):
            self.intensity = IntensityConfig(**self.intensity)
        if isinstance(self.cutmix, dict):
            self.cutmix = CutMixConfig(**self.cutmix)


@dataclass
class Views:
    """The views of one batch; see the module docstring for layouts.

    Teacher inputs: ``whole`` (part-whole stage) or ``global_crops`` (localizability warm-up).
    Student inputs: ``global_crops``, ``local_crops``, ``parts`` (composability) and ``whole``
    (decomposability). Local crop ``v`` targets the teacher's whole when ``local_part_index[v]`` is
    -1, else the teacher's part with that index.

    Box-mode CutMix (``partner`` set, ``part_swap`` None): with teacher distributions ``p_w``
    (B, K) of the wholes and ``p_parts`` (B, k*k, K) of the parts, the global crops' targets are
    ``mix_targets(p_w, global_lambda, partner)`` and the local crops' are
    ``mix_targets(p_w, local_lambda, partner)`` for nested crops and
    ``mix_targets(p_parts[:, local_part_index], local_lambda, partner)`` for part-local ones.
    In parts mode all views come from the mixed whole, so the teacher's outputs of ``whole`` and
    ``parts`` are the targets as they are; the lambdas then only report each view's own fraction.
    Without a partner (CutMix off, or a batch of one) these fields are None.
    """

    mode: str
    level: int
    k: int
    whole: torch.Tensor
    """(B, C, G, G) W at the global size."""
    whole_box: torch.Tensor
    """(B, 4)"""
    global_crops: torch.Tensor
    """(B, n_global, C, G, G)"""
    global_boxes: torch.Tensor
    local_crops: torch.Tensor
    """(B, n_local_total, C, L, L): nested crops first (smallest band first), then part-local crops
    grouped part by part."""
    local_boxes: torch.Tensor
    local_part_index: torch.Tensor
    """(n_local_total,) long: -1 for nested crops, else the part the crop lies in."""
    parts: torch.Tensor | None
    """(B, k*k, C, G, G) in raster order (None in the localizability warm-up)."""
    part_boxes: torch.Tensor
    """(B, k*k, 4) in raster order; they partition ``whole_box``."""
    global_angles: torch.Tensor | None = None
    local_angles: torch.Tensor | None = None
    partner: torch.Tensor | None = None
    """(B,) the sample each one was mixed with (None without CutMix)."""
    global_lambda: torch.Tensor | None = None
    """(B, n_global) fraction of each global crop's pixels that are its own sample's."""
    local_lambda: torch.Tensor | None = None
    part_swap: torch.Tensor | None = None
    """(B, k*k) parts taken from the partner (``cutmix.mode: parts``); all views come from the mixed whole."""

    @property
    def batch_size(self) -> int:
        return self.whole.shape[0]

    @property
    def n_parts(self) -> int:
        return self.k * self.k


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise HolonsError(f"views need a (B, C, H, W) image batch, got {shape}")
    if not images.is_floating_point():
        raise HolonsError(f"views need floating-point images in [0, 1], got dtype {images.dtype}")
    if images.shape[0] < 1:
        raise HolonsError("views need a non-empty batch")
    return images if images.dtype in (torch.float32, torch.float64) else images.float()


class ViewGenerator:
    """Cuts, mixes and augments all views of a batch (see :class:`Views`)."""

    def __init__(self, cfg: ViewConfig | None = None) -> None:
        self.cfg = cfg or ViewConfig()

    def __call__(
        self,
        images: torch.Tensor,
        level: int | None = None,
        generator: torch.Generator | None = None,
        mode: Mode = "part_whole",
    ) -> Views:
        """Views of ``images`` (B, C, H, W) at ``level`` (default ``cfg.level``).

        ``mode="part_whole"``: W, ``n_global`` global crops, local crops (``cfg.local_crops``) and
        the parts. ``mode="localizability"`` (the warm-up): ``warmup_n_global`` global crops of W
        for the teacher and student, nested local crops of W for the student, warm-up rotations, no
        parts.
        """
        if mode not in ("part_whole", "localizability"):
            raise HolonsError(f"unknown view mode {mode!r}; use part_whole or localizability")
        cfg = self.cfg
        images = _check_images(images)
        level = cfg.level if level is None else level
        b, _, h, w = images.shape
        hw = (h, w)
        device = images.device
        warmup = mode == "localizability"
        k = cfg.k

        whole = whole_boxes(b, hw, level, generator, cfg.margin, device)
        if min(whole[0, 2] - whole[0, 0], whole[0, 3] - whole[0, 1]) < k:
            raise HolonsError(f"level {level} leaves fewer than k={k} pixels per side of a {h}x{w} image")
        parts = part_boxes(whole, k)
        n_global = cfg.warmup_n_global if warmup else cfg.n_global
        degrees = cfg.warmup_rotation_degrees if warmup else cfg.rotation_degrees
        g_boxes = global_crop_boxes(whole, n_global, generator, cfg.global_scale, cfg.global_aspect)

        local_sets, index_sets = [], []
        if warmup or cfg.local_crops in ("nested", "both"):
            local_sets.append(nested_local_boxes(
                whole, cfg.n_local, generator, cfg.local_scale, cfg.local_tall_aspect, cfg.local_wide_aspect,
                cfg.local_position_jitter))
            index_sets.append(torch.full((cfg.n_local,), -1, dtype=torch.long, device=device))
        if not warmup and cfg.local_crops in ("part_local", "both"):
            boxes, index = part_local_boxes(parts, cfg.n_part_local, generator, cfg.part_local_scale,
                                            cfg.part_local_aspect)
            local_sets.append(boxes)
            index_sets.append(index)
        l_boxes = torch.cat(local_sets, dim=1)
        l_index = torch.cat(index_sets)
        n_loc = l_boxes.shape[1]

        g_angles = sample_angles((b, n_global), degrees, generator, device)
        l_angles = sample_angles((b, n_loc), degrees, generator, device)
        wp_angles = (sample_angles((b, 1 + k * k), cfg.rotation_degrees, generator, device)
                     if cfg.rotate_whole_and_parts else None)
        g_flips = l_flips = None
        if cfg.hflip:
            g_flips = uniform((b, n_global), generator, device) < cfg.hflip_prob
            l_flips = uniform((b, n_loc), generator, device) < cfg.hflip_prob

        # One grid and one grid_sample per output size: [whole, global crops, parts] and the locals.
        gs, ls = cfg.global_size, cfg.local_size
        names = ["whole", "global"] + ([] if warmup else ["parts"])
        counts = {"whole": 1, "global": n_global, "parts": k * k}
        big_boxes = [whole[:, None], g_boxes] + ([] if warmup else [parts])
        zeros = torch.zeros(b, 1 + k * k, device=device)
        wp = wp_angles if wp_angles is not None else zeros
        big_angles = None
        if g_angles is not None or wp_angles is not None:
            g_ang = g_angles if g_angles is not None else torch.zeros(b, n_global, device=device)
            big_angles = torch.cat([wp[:, :1], g_ang] + ([] if warmup else [wp[:, 1:]]), dim=1)
        big_flips = None
        if g_flips is not None:
            no = torch.zeros(b, 1 + k * k, dtype=torch.bool, device=device)
            big_flips = torch.cat([no[:, :1], g_flips] + ([] if warmup else [no[:, 1:]]), dim=1)
        big_grid = view_grid(torch.cat(big_boxes, dim=1), hw, gs, big_angles, big_flips)
        grids = dict(zip(names, big_grid.split([counts[n] * gs for n in names], dim=1), strict=True))
        grids["local"] = view_grid(l_boxes, hw, ls, l_angles, l_flips)
        big_views = sample_views(images, big_grid, gs, cfg.padding_mode)
        out = dict(zip(names, big_views.split([counts[n] for n in names], dim=1), strict=True))
        out["local"] = sample_views(images, grids["local"], ls, cfg.padding_mode)

        mix = cfg.cutmix
        partner = g_lam = l_lam = swap = None
        if mix.prob > 0 and b > 1:
            partner = sample_partner(b, generator, device)
            # The partner's pixels at the same position relative to its own whole.
            shift = (whole[partner, :2] - whole[:, :2]) * 2 / torch.tensor([w, h], device=device)
            shift = shift[:, None, None, :]
            source = images[partner]
            if mix.mode == "parts":
                swap = sample_part_swaps(b, k, mix.prob, generator, device)
                g_lam, l_lam = self._swap_parts(out, grids, source, shift, swap, whole, hw)
            else:
                students = ["local"] if warmup else ["global", "local"]
                lams = {}
                for name in students:
                    size = gs if name == "global" else ls
                    theirs = sample_views(source, grids[name] + shift, size, cfg.padding_mode)
                    mine = out[name]
                    nv = mine.shape[1]
                    res = cutmix(mine.flatten(0, 1), generator, mix.prob, mix.alpha,
                                 partner=(partner[:, None] * nv + torch.arange(nv, device=device)).flatten(),
                                 partner_images=theirs.flatten(0, 1),
                                 grid_k=k if mix.snap_to_grid else None)
                    out[name] = res.images.reshape(mine.shape)
                    lams[name] = res.lam.reshape(b, nv)
                g_lam = lams.get("global", torch.ones(b, n_global, device=device))
                l_lam = lams["local"]

        icfg = cfg.intensity
        blur = {"whole": icfg.blur_prob_whole, "parts": icfg.blur_prob_whole, "global": icfg.blur_prob_global,
                "local": icfg.blur_prob_local}
        for name in ("whole", "global", "parts", "local"):
            if name in out:
                out[name] = augment_intensity(out[name], icfg, blur[name], generator)

        return Views(
            mode=mode, level=level, k=k,
            whole=out["whole"][:, 0], whole_box=whole,
            global_crops=out["global"], global_boxes=g_boxes,
            local_crops=out["local"], local_boxes=l_boxes, local_part_index=l_index,
            parts=out.get("parts"), part_boxes=parts,
            global_angles=g_angles, local_angles=l_angles,
            partner=partner, global_lambda=g_lam, local_lambda=l_lam, part_swap=swap,
        )

    def _swap_parts(
        self,
        out: dict[str, torch.Tensor],
        grids: dict[str, torch.Tensor],
        source: torch.Tensor,
        shift: torch.Tensor,
        swap: torch.Tensor,
        whole: torch.Tensor,
        hw: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace, in every view, the pixels that fall in a swapped part of W by the partner's
        pixels at the same position in its W; returns the global and local crops' own fractions."""
        h, w = hw
        lams = {}
        for name, views in list(out.items()):
            b, v, c, s, _ = views.shape
            grid = grids[name]
            points = (grid + 1) * torch.tensor([w / 2, h / 2], device=grid.device)
            index, inside = part_cells(points, whole, self.cfg.k)
            take = (torch.gather(swap, 1, index.flatten(1)).reshape(index.shape) & inside)
            take = take.reshape(b, v, s, s)[:, :, None]
            if take.any():
                theirs = sample_views(source, grid + shift, s, self.cfg.padding_mode)
                out[name] = torch.where(take, theirs, views)
            lams[name] = 1.0 - take.flatten(2).float().mean(2)
        return lams["global"], lams["local"]


def make_views(
    images: torch.Tensor,
    level: int | None = None,
    cfg: ViewConfig | None = None,
    generator: torch.Generator | None = None,
    mode: Mode = "part_whole",
) -> Views:
    """Functional form of :class:`ViewGenerator`."""
    return ViewGenerator(cfg)(images, level=level, generator=generator, mode=mode)
