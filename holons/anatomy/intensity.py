"""Per-view augmentation suited to radiographs, batched over ``(B, V, C, S, S)`` view groups.

Window/level (brightness/contrast) jitter, gamma, Gaussian blur and optional noise act on
intensities in [0, 1] (the cache's range) with an independent draw per view; small rotations are
drawn here and applied by the resampler together with the crop, in the same ``grid_sample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from holons.anatomy._random import generator_device, log_uniform, uniform
from holons.errors import ConfigError


@dataclass
class IntensityConfig:
    """Intensity augmentation knobs; probabilities are per view."""

    window_prob: float = 0.8
    """Probability of a window/level jitter."""
    level_shift: float = 0.1
    """Window centre moves by up to this much (intensities in [0, 1])."""
    width_scale: tuple[float, float] = (0.75, 1.33)
    """Window width factor (log-uniform); below 1 raises contrast and saturates."""
    gamma_prob: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    """Gamma exponent range (log-uniform)."""
    blur_prob_global: float = 1.0
    blur_prob_local: float = 0.5
    blur_prob_whole: float = 0.1
    """Blur probability of the whole W and of the parts."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Blur sigma range in pixels of a ``blur_reference_size`` view; scaled with the view size."""
    blur_reference_size: int = 224
    noise_prob: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.03)

    def __post_init__(self) -> None:
        for name in ("window_prob", "gamma_prob", "blur_prob_global", "blur_prob_local", "blur_prob_whole",
                     "noise_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"intensity.{name} must be a probability in [0, 1], got {value}")
        for name in ("width_scale", "gamma", "blur_sigma", "noise_std"):
            lo, hi = getattr(self, name)
            if lo > hi or lo < 0 or (name in ("width_scale", "gamma") and lo <= 0):
                raise ConfigError(f"intensity.{name} must be an increasing range >= 0, got {(lo, hi)}")
        if self.blur_reference_size < 1:
            raise ConfigError("intensity.blur_reference_size must be >= 1")


def sample_angles(
    shape: tuple[int, ...], degrees: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """Rotation angles U(-degrees, degrees) per view, or None when ``degrees`` is 0."""
    if degrees <= 0:
        return None
    return uniform(shape, generator, device, -degrees, degrees)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalized 1-D Gaussian kernels ``(N, 2 * radius + 1)`` for per-view ``sigma`` (N,)."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(views: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Blur each image of ``views`` (N, C, S, S) with its own ``sigma`` (N,), separably, reflect-padded."""
    n, c, h, w = views.shape
    max_sigma = float(sigma.max()) if max_sigma is None else max_sigma
    radius = min(max(1, math.ceil(3 * max_sigma)), h - 1, w - 1)
    if radius < 1:
        return views
    kernel = gaussian_kernels(sigma.to(views.dtype), radius).repeat_interleave(c, dim=0)
    x = views.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


def augment_intensity(
    views: torch.Tensor, cfg: IntensityConfig, blur_prob: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Window/level, gamma, blur (with ``blur_prob``) and noise, drawn independently per view.

    ``views`` is ``(B, V, C, S, S)`` in [0, 1]; the result is clamped to [0, 1]. Noise fields are
    drawn on the generator's device: pass a generator on the views' device to avoid a copy.
    """
    b, v, c, h, w = views.shape
    u = uniform((b, v, 9), generator, views.device)
    shape = (b, v, 1, 1, 1)

    x = views
    if cfg.window_prob > 0:
        # (x - level) / width + 0.5 where drawn, the identity elsewhere, as one multiply-add.
        on = u[..., 0] < cfg.window_prob
        width = log_uniform(u[..., 1], *cfg.width_scale)
        level = 0.5 + cfg.level_shift * (2 * u[..., 2] - 1)
        gain = torch.where(on, 1.0 / width, torch.ones_like(width)).reshape(shape).to(x.dtype)
        offset = torch.where(on, 0.5 - level / width, torch.zeros_like(width)).reshape(shape).to(x.dtype)
        x = torch.addcmul(offset, x, gain).clamp_(0.0, 1.0)

    flat = x.reshape(b * v, c, h, w)
    if cfg.gamma_prob > 0:
        chosen = (u[..., 3] < cfg.gamma_prob).reshape(-1).nonzero().squeeze(1)
        if chosen.numel():
            gamma = log_uniform(u[..., 4], *cfg.gamma).reshape(-1).index_select(0, chosen)
            powered = flat.index_select(0, chosen).clamp_min(0.0).pow(gamma[:, None, None, None].to(x.dtype))
            flat = flat.index_copy(0, chosen, powered)

    if blur_prob > 0:
        scale = min(h, w) / cfg.blur_reference_size
        lo, hi = cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale
        sigma = (lo + (hi - lo) * u[..., 5]).reshape(-1)
        chosen = (u[..., 6] < blur_prob).reshape(-1).nonzero().squeeze(1)
        if chosen.numel():
            blurred = gaussian_blur(flat.index_select(0, chosen), sigma.index_select(0, chosen), max_sigma=hi)
            flat = flat.index_copy(0, chosen, blurred)
    x = flat.reshape(b, v, c, h, w)

    if cfg.noise_prob > 0:
        std = cfg.noise_std[0] + (cfg.noise_std[1] - cfg.noise_std[0]) * u[..., 8]
        std = torch.where(u[..., 7] < cfg.noise_prob, std, torch.zeros_like(std)).reshape(shape)
        noise = torch.randn(x.shape, generator=generator, device=generator_device(generator), dtype=x.dtype)
        x = x + std.to(x.dtype) * noise.to(x.device)
    return x.clamp(0.0, 1.0)
