"""How good a distilled set is: a fresh ConvNet trained on it, on the same number of random real
images per class, or on all training images, then tested on the held-out split; several seeds.

Every arm trains the same network the same way (SGD with momentum 0.9, weight decay 5e-4, the
learning rate divided by 10 halfway, ``steps`` batches of up to ``batch_size`` images), with the
same light augmentation: a random shift of up to 1/8 of the side and a scale of +-10 %
(:func:`holons.finetune.karyotype.data.random_affine`), plus a mirror with p = 1/2 when ``hflip``.
The seed fixes the network's initialisation, the batches, the augmentation and the random real
subset. Reported per arm: test accuracy per seed, mean and sample sd.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from holons.finetune.distill.config import DistillConfig
from holons.finetune.distill.convnet import ConvNet
from holons.finetune.distill.data import KARYOTYPE, RealSet
from holons.finetune.karyotype.data import random_affine

SHIFT, SCALE = 0.125, 0.1


def augment(images: torch.Tensor, generator: torch.Generator, *, hflip: bool) -> torch.Tensor:
    """The training augmentation (module docstring), differentiable in ``images``: a random shift and
    scale, then a mirror with p = 1/2 when ``hflip``."""
    out = random_affine(images, generator, translate=SHIFT, scale=SCALE)
    if hflip:
        flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def random_real_subset(real: RealSet, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` random training images of every class (all of a smaller class)."""
    gen = torch.Generator().manual_seed(int(seed))
    picks = [idx[torch.randperm(len(idx), generator=gen)[:per_class]] for idx in real.class_indices()]
    return torch.cat(picks)


@torch.no_grad()
def test_accuracy(net: ConvNet, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                  batch_size: int = 512) -> float:
    """Top-1 accuracy of ``net`` on uint8 images ``x``."""
    net.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = net(x[i:i + batch_size].to(device).float() / 255.0)
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


def train_convnet(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: DistillConfig, *, seed: int,
                  hflip: bool, device: torch.device) -> ConvNet:
    """A fresh ConvNet trained on uint8 images ``x`` with labels ``y`` (module docstring)."""
    e = cfg.evaluate
    torch.manual_seed(seed)
    net = ConvNet(num_classes, size=x.shape[-1], width=cfg.net.width, depth=cfg.net.depth).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=e.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [e.steps // 2], gamma=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    net.train()
    for _ in range(e.steps):
        idx = torch.randperm(len(x), generator=gen)[:e.batch_size]
        batch = augment(x[idx].float() / 255.0, gen, hflip=hflip)
        loss = F.cross_entropy(net(batch.to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net


def mirrors(cfg: DistillConfig, real: RealSet) -> bool:
    """Whether training mirrors images: ``evaluate.hflip``, where ``auto`` is on for chromosomes (a
    mirror keeps the type) and off for radiographs (they have laterality)."""
    return cfg.evaluate.hflip == "on" or (cfg.evaluate.hflip == "auto" and real.kind == KARYOTYPE)


def evaluate_arms(real: RealSet, distilled_x: torch.Tensor, distilled_y: torch.Tensor, cfg: DistillConfig,
                  device: torch.device, *, progress: bool = False) -> dict:
    """Test accuracy of a ConvNet trained on every configured arm, for every seed (module docstring)."""
    e = cfg.evaluate
    hflip = mirrors(cfg, real)
    runs = [(arm, seed) for arm in e.arms for seed in e.seeds]
    per_seed: dict[str, list[float]] = {arm: [] for arm in e.arms}
    sizes: dict[str, int] = {}
    for arm, seed in tqdm(runs, desc="evaluate", disable=not progress):
        if arm == "distilled":
            x, y = distilled_x, distilled_y
        elif arm == "random":
            idx = random_real_subset(real, cfg.match.ipc, seed)
            x, y = real.train_x[idx], real.train_y[idx]
        else:
            x, y = real.train_x, real.train_y
        net = train_convnet(x, y, real.num_classes, cfg, seed=seed, hflip=hflip, device=device)
        per_seed[arm].append(test_accuracy(net, real.test_x, real.test_y, device))
        sizes[arm] = len(x)
    return {
        "test_images": len(real.test_x), "seeds": list(e.seeds), "hflip": hflip, "steps": e.steps,
        "arms": {arm: {"accuracy_mean": float(np.mean(v)),
                       "accuracy_sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                       "accuracy_per_seed": v, "train_images": sizes[arm]} for arm, v in per_seed.items()},
    }
