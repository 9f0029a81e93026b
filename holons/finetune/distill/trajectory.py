"""Matching training trajectories (MTT, Cazenavette et al., CVPR 2022).

Distribution matching compares embeddings under untrained networks; MTT compares what the images
*teach*. Expert networks are first trained on the real set and their parameters saved after every
epoch (a trajectory). Each matching iteration takes an expert's parameters at a random early epoch
``t``, trains a copy for ``mtt_syn_steps`` SGD steps on the synthetic images (batches of them, the
evaluation's augmentation, a learnable step size), and asks the result to land where the expert was
``mtt_span`` epochs later:

    loss = |theta_hat - theta_{t+span}|^2 / |theta_t - theta_{t+span}|^2

The unrolled steps are differentiated through (``torch.func.functional_call`` on a flat parameter
vector), so the loss moves the images and the step size. The normalisation makes the loss
comparable across epochs and experts. FYI's flip enters as in DM: the mirror-by-halves of each image
joins the pool the unrolled steps draw from.

The experts are trained the way the evaluation trains (the same ConvNet, shift / scale augmentation,
the mirror where the task allows one) but with plain SGD (no momentum, no weight decay), as MTT does,
so that a trajectory is a sequence of gradient steps a synthetic set can imitate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from holons.finetune.distill.config import DistillConfig
from holons.finetune.distill.convnet import ConvNet
from holons.finetune.distill.data import RealSet
from holons.finetune.distill.evaluate import augment


def flat_parameters(net: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``net`` as one detached vector (in ``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def as_parameters(flat: torch.Tensor, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``flat`` cut back into ``net``'s named parameter shapes (views, so gradients flow to ``flat``)."""
    out, i = {}, 0
    for name, p in net.named_parameters():
        out[name] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    if i != flat.numel():
        raise ValueError(f"a vector of {flat.numel()} values does not fit a network of {i} parameters")
    return out


def train_expert(real: RealSet, cfg: DistillConfig, *, seed: int, hflip: bool, device: torch.device,
                 progress: bool = False) -> torch.Tensor:
    """One expert trajectory: ``(experts.epochs + 1) x P`` parameters of a ConvNet trained on all
    training images, from its initialisation to the end of every epoch (module docstring)."""
    e = cfg.experts
    torch.manual_seed(seed)
    net = ConvNet(real.num_classes, size=real.train_x.shape[-1], width=cfg.net.width,
                  depth=cfg.net.depth).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=e.lr)
    gen = torch.Generator().manual_seed(seed + 1)
    snapshots = [flat_parameters(net).cpu()]
    for _ in tqdm(range(e.epochs), desc=f"expert (seed {seed})", disable=not progress):
        order = torch.randperm(len(real.train_x), generator=gen)
        for i in range(0, len(order), e.batch_size):
            idx = order[i:i + e.batch_size]
            batch = augment(real.train_x[idx].float() / 255.0, gen, hflip=hflip)
            loss = F.cross_entropy(net(batch.to(device)), real.train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snapshots.append(flat_parameters(net).cpu())
    return torch.stack(snapshots)


def trajectory_loss(net: ConvNet, syn: torch.Tensor, labels: torch.Tensor, start: torch.Tensor,
                    target: torch.Tensor, syn_lr: torch.Tensor, *, steps: int, batch_size: int,
                    generator: torch.Generator, hflip: bool) -> torch.Tensor:
    """The normalised distance between ``steps`` SGD steps on the synthetic images from ``start``
    and the expert's ``target`` (module docstring); differentiable in ``syn`` and ``syn_lr``.
    ``net`` only lends its architecture."""
    params = start.clone().requires_grad_(True)
    for _ in range(steps):
        idx = torch.randperm(len(syn), generator=generator)[:batch_size].to(syn.device)
        x = augment(syn[idx], generator, hflip=hflip)
        logits = functional_call(net, as_parameters(params, net), (x,))
        grad = torch.autograd.grad(F.cross_entropy(logits, labels[idx]), params, create_graph=True)[0]
        params = params - syn_lr * grad
    return ((params - target) ** 2).sum() / ((start - target) ** 2).sum().clamp_min(1e-12)
