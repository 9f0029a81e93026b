"""A small generative-prompt localizer (after Zhao et al.'s GenPromp, without Stable Diffusion).

Two parts trained together from image-level labels:

- a discriminative classifier on the backbone (global pooling + linear);
- a small conditional denoiser (a two-level U-Net on the image at ``denoise_size`` pixels) trained
  from scratch to predict the noise added to an image (DDPM, linear schedule of ``timesteps``). It
  is conditioned through cross-attention on a context of ``null_tokens`` learned tokens shared by all
  classes plus one class token: the class's learnable prompt embedding (representative), or, half
  of the time, that prompt plus the classifier's class vector projected into the prompt space
  (combined), so that the projection learns to speak the denoiser's language.

At inference the combined embedding of the target class is the class token; the denoiser runs on the
image noised at ``map_timesteps`` (fixed noise, so maps are deterministic) and the cross-attention of
every image position onto the class token, at every attention scale and timestep, averaged, is the
localization map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from holons.finetune.localize.base import Localizer, LossTerms
from holons.ssl.backbone import Backbone

__all__ = ["GenPrompLocalizer", "TinyDenoiser"]


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _CrossAttention(nn.Module):
    """Image positions attend to context tokens; the last attention probabilities are kept in ``probs``
    (``B x h x w x T``) when ``record`` is set."""

    def __init__(self, channels: int, context_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.q, self.k = nn.Linear(channels, channels), nn.Linear(context_dim, channels)
        self.v, self.out = nn.Linear(context_dim, channels), nn.Linear(channels, channels)
        self.record = False
        self.probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))
        probs = (q @ self.k(context).transpose(1, 2) / math.sqrt(c)).softmax(dim=-1)
        if self.record:
            self.probs = probs.view(b, h, w, -1)
        return x + self.out(probs @ self.v(context)).transpose(1, 2).reshape(b, c, h, w)


class TinyDenoiser(nn.Module):
    """A two-level U-Net predicting the noise of a 1-channel image, cross-attending to a context at
    1/2, 1/4 and again 1/2 of the input resolution."""

    def __init__(self, context_dim: int, width: int = 32) -> None:
        super().__init__()
        self.t_dim, c1, c2 = 4 * width, width, 2 * width
        self.time = nn.Sequential(nn.Linear(width, self.t_dim), nn.SiLU(), nn.Linear(self.t_dim, self.t_dim))
        self.width = width
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        self.enc1, self.down1 = _ResBlock(c1, c1, self.t_dim), nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.enc2, self.attn2 = _ResBlock(c2, c2, self.t_dim), _CrossAttention(c2, context_dim)
        self.down2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid, self.attn_mid = _ResBlock(c2, c2, self.t_dim), _CrossAttention(c2, context_dim)
        self.dec2, self.attn_dec2 = _ResBlock(2 * c2, c2, self.t_dim), _CrossAttention(c2, context_dim)
        self.dec1 = _ResBlock(c2 + c1, c1, self.t_dim)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)

    def attention_layers(self) -> list[_CrossAttention]:
        return [self.attn2, self.attn_mid, self.attn_dec2]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        temb = self.time(_timestep_embedding(t, self.width))
        h1 = self.enc1(self.conv_in(x), temb)
        h2 = self.attn2(self.enc2(self.down1(h1), temb), context)
        m = self.attn_mid(self.mid(self.down2(h2), temb), context)
        up2 = F.interpolate(m, size=h2.shape[-2:], mode="nearest")
        d2 = self.attn_dec2(self.dec2(torch.cat([up2, h2], dim=1), temb), context)
        up1 = F.interpolate(d2, size=h1.shape[-2:], mode="nearest")
        return self.conv_out(F.silu(self.dec1(torch.cat([up1, h1], dim=1), temb)))


class GenPrompLocalizer(Localizer):
    """Classifier + prompt-conditioned denoiser; maps from the denoiser's cross-attention."""

    def __init__(self, backbone: Backbone, num_classes: int, *, denoise_size: int = 32, prompt_dim: int = 64,
                 null_tokens: int = 2, width: int = 32, timesteps: int = 1000,
                 map_timesteps: Sequence[int] = (100, 300, 500), denoise_weight: float = 1.0,
                 combine_weight: float = 1.0, **kwargs) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        if denoise_size % 4 or denoise_size < 8:
            raise ValueError(f"denoise_size must be a multiple of 4, >= 8; got {denoise_size}")
        if not map_timesteps or any(not 0 <= int(t) < timesteps for t in map_timesteps):
            raise ValueError(f"map_timesteps must lie within [0, {timesteps}), got {list(map_timesteps)}")
        self.denoise_size, self.prompt_dim, self.width = int(denoise_size), int(prompt_dim), int(width)
        self.timesteps, self.map_timesteps = int(timesteps), [int(t) for t in map_timesteps]
        self.denoise_weight, self.combine_weight = float(denoise_weight), float(combine_weight)
        self.head = nn.Linear(self.channels, num_classes)
        self.prompts = nn.Parameter(torch.randn(num_classes, prompt_dim) * 0.5)
        self.null = nn.Parameter(torch.randn(int(null_tokens), prompt_dim) * 0.5)
        self.to_prompt = nn.Linear(self.channels, prompt_dim)
        self.denoiser = TinyDenoiser(prompt_dim, width)
        betas = torch.linspace(1e-4, 0.02, self.timesteps)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0), persistent=False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))

    def class_embeddings(self, target: torch.Tensor, combined: torch.Tensor | bool = True) -> torch.Tensor:
        """``B x D`` class tokens: the prompt (representative), plus the projected classifier vector where
        ``combined`` (discriminative; the classifier itself is not changed by this path)."""
        prompt = self.prompts[target]
        mix = self.combine_weight * self.to_prompt(self.head.weight.detach()[target])
        weight = combined.float()[:, None] if torch.is_tensor(combined) else float(combined)
        return prompt + weight * mix

    def _context(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.null.expand(len(tokens), -1, -1), tokens[:, None]], dim=1)

    def _clean(self, images: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(images, size=(self.denoise_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        return small * 2 - 1

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t][:, None, None, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, images: torch.Tensor, labels: torch.Tensor, *,
             progress: float) -> tuple[torch.Tensor, LossTerms]:
        ce = F.cross_entropy(self.logits(images), labels)
        x0 = self._clean(images)
        t = torch.randint(0, self.timesteps, (len(images),), device=images.device)
        noise = torch.randn_like(x0)
        combined = torch.rand(len(images), device=images.device) < 0.5
        context = self._context(self.class_embeddings(labels, combined))
        denoise = F.mse_loss(self.denoiser(self._noised(x0, t, noise), t, context), noise)
        return ce + self.denoise_weight * denoise, {"ce": ce.item(), "denoise": denoise.item()}

    def class_maps(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x0 = self._clean(images)
        generator = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        context = self._context(self.class_embeddings(target, True))
        layers = self.denoiser.attention_layers()
        total = torch.zeros(len(images), self.denoise_size, self.denoise_size, device=images.device)
        try:
            for layer in layers:
                layer.record = True
            for step in self.map_timesteps:
                t = torch.full((len(images),), step, device=images.device, dtype=torch.long)
                self.denoiser(self._noised(x0, t, noise), t, context)
                for layer in layers:
                    attention = layer.probs[..., -1][:, None]  # onto the class token
                    total += F.interpolate(attention, size=total.shape[-2:], mode="bilinear",
                                           align_corners=False)[:, 0]
        finally:
            for layer in layers:
                layer.record, layer.probs = False, None
        return total / (len(layers) * len(self.map_timesteps))

    def describe(self) -> dict:
        return {"denoise_size": self.denoise_size, "prompt_dim": self.prompt_dim,
                "null_tokens": int(len(self.null)),
                "width": self.width, "timesteps": self.timesteps, "map_timesteps": self.map_timesteps,
                "denoise_weight": self.denoise_weight, "combine_weight": self.combine_weight}
