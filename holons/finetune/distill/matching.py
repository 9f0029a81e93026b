"""Distribution and gradient matching of synthetic images to real ones, with FYI's flip.

**Distribution matching** (DM, Zhao & Bilen, WACV 2023): under a freshly initialised ConvNet, the
mean embedding of each class's synthetic images should equal the mean embedding of a real batch of
that class; the loss is the sum over classes of the squared distance of the two means. A new
network every iteration makes the synthetic set match the real one under many random embeddings.

**Gradient matching** (DC, Zhao et al., ICLR 2021): the cross-entropy gradient of the network's
weights on each class's synthetic images should point where the gradient on a real batch does
(1 - cosine per output channel, summed over layers); the network is trained on real data between
matchings and reinitialised every few iterations.

**FYI** (Son et al., ECCV 2024): real sets show a part on the left in some images and on the right
in others (bilateral equivalence), so plain matching paints it on both sides of a synthetic image.
With ``fyi`` each synthetic image is learned as two halves and enters the matching twice: as it is,
and mirrored, the mirror's left half being the image's right half flipped and its right half the
left half flipped (:func:`matching_views`). A part the real set shows on either side is then matched
by one copy on one side, and the other half is free to learn other detail.

**Siamese augmentation** (DSA, Zhao & Bilen, ICML 2021; DM matches under it): every iteration each
class draws one random pose (shift, scale, and a mirror where the task allows one) and its real batch
and its synthetic images are both moved by it before the embedding (:func:`class_poses`), so the
synthetic images match the real ones under the poses the evaluation trains with, not only as drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from holons.finetune.distill.convnet import ConvNet
from holons.finetune.poses import random_rigid_thetas, rigid_transform


def class_poses(num_classes: int, generator: torch.Generator, *, translate: float, scale: float,
                flip: bool) -> torch.Tensor:
    """One random pose per class (``num_classes x 2 x 3``): a shift by up to +-``translate`` of the
    side, an isotropic scale by 1 +- ``scale``, a mirror with p = 1/2 when ``flip``; no rotation."""
    return random_rigid_thetas(num_classes, max_degrees=0.0, max_shift=2.0 * translate,
                               scale_range=(1.0 - scale, 1.0 + scale), flip=flip, generator=generator)


def posed(images: torch.Tensor, labels: torch.Tensor, poses: torch.Tensor | None) -> torch.Tensor:
    """``images`` each moved by its class's pose (background 0 filled); unchanged when ``poses`` is
    None. Differentiable in ``images``."""
    return images if poses is None else rigid_transform(images, poses[labels.to(poses.device)])


def mirror_by_halves(images: torch.Tensor) -> torch.Tensor:
    """The mirror image assembled from the two halves: left := flip(right half), right := flip(left
    half) (for an odd width the middle column stays)."""
    w = images.shape[-1]
    half = w // 2
    left, middle, right = images[..., :half], images[..., half:w - half], images[..., w - half:]
    return torch.cat([right.flip(-1), middle, left.flip(-1)], dim=-1)


def matching_views(syn: torch.Tensor, labels: torch.Tensor, fyi: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the matching step sees of the synthetic images: themselves, and with ``fyi`` also their
    mirrors (same labels)."""
    if not fyi:
        return syn, labels
    return torch.cat([syn, mirror_by_halves(syn)]), torch.cat([labels, labels])


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C x D`` mean embedding per class (every class must be present)."""
    sums = torch.zeros(num_classes, embeddings.shape[1], device=embeddings.device, dtype=embeddings.dtype)
    sums = sums.index_add(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(embeddings.dtype)
    return sums / counts[:, None]


def dm_loss(net: ConvNet, real: torch.Tensor, real_labels: torch.Tensor, syn: torch.Tensor,
            syn_labels: torch.Tensor, num_classes: int, *, fyi: bool = False,
            poses: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over classes of ``|mean embed(real_c) - mean embed(syn_c)|^2`` (synthetic views per
    :func:`matching_views`, both sides moved by ``poses`` per :func:`posed`); differentiable in ``syn``."""
    with torch.no_grad():
        target = class_means(net.embed(posed(real, real_labels, poses)), real_labels, num_classes)
    views, view_labels = matching_views(syn, syn_labels, fyi)
    mean_syn = class_means(net.embed(posed(views, view_labels, poses)), view_labels, num_classes)
    return ((target - mean_syn) ** 2).sum()


def _layer_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine per output channel of two gradients of one weight, summed (biases and norms skipped)."""
    if a.ndim == 1:
        return a.new_zeros(())
    a, b = a.flatten(1), b.flatten(1)
    return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-6)).sum()


def gm_loss(net: ConvNet, real: torch.Tensor, real_labels: torch.Tensor, syn: torch.Tensor,
            syn_labels: torch.Tensor, num_classes: int, *, fyi: bool = False,
            poses: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over classes of the gradient distance of the real and synthetic batches (both moved by
    ``poses``; differentiable in ``syn``)."""
    params = [p for p in net.parameters() if p.requires_grad]
    views, view_labels = matching_views(syn, syn_labels, fyi)
    real, views = posed(real, real_labels, poses), posed(views, view_labels, poses)
    loss = syn.new_zeros(())
    for c in range(num_classes):
        r, s = real_labels == c, view_labels == c
        if not r.any() or not s.any():
            continue
        g_real = torch.autograd.grad(F.cross_entropy(net(real[r]), real_labels[r]), params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(views[s]), view_labels[s]), params, create_graph=True)
        loss = loss + sum(_layer_distance(gr.detach(), gs) for gr, gs in zip(g_real, g_syn, strict=True))
    return loss
