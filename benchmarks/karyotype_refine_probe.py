"""Does a localizer refinement help the L-Net? A probe on a trained run's L-Net checkpoint.

    .venv/bin/python benchmarks/karyotype_refine_probe.py --run RUN_DIR --manifest MANIFEST.csv \\
        --gradient mask sampling [--lr 2e-4] [--batches 120] [--cases 60]

Loads ``RUN_DIR/checkpoints/lnet_1.pt`` (the state after the first L-Net step), trains only the
localizer from the L-Net's loss for ``--batches`` batches (Adam, the run's batch size, drawn from
``--cases`` training cells), once per box-gradient mode, and prints the L-Net's validation type
accuracy before and after, with the box of the first image along the way. The refinement step of
the schedule (``locrefine``) does the same over whole epochs.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import yaml

from holons.config import load_config
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.data import random_flips
from holons.finetune.karyotype.losses import phase_loss
from holons.finetune.karyotype.model import VarifocalNet
from holons.finetune.karyotype.schedule import schedule
from holons.finetune.karyotype.train import (
    prepare_data,
    set_trainable,
    shuffled_batches,
    validate_phase,
)
from holons.runs import load_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--gradient", nargs="+", choices=["mask", "sampling"], default=["mask", "sampling"])
    ap.add_argument("--lr", type=float, default=None, help="default: the run's refinement lr")
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--cases", type=int, default=180, help="training cells to draw the batches from")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(KaryotypeConfig, None, yaml.safe_load((args.run / "config.yaml").read_text()))
    cfg.data.max_train_cases = args.cases
    cfg.model.g_pretrained_dir = cfg.model.l_pretrained_dir = None  # the weights come from the checkpoint
    checkpoint = load_checkpoint(args.run / "checkpoints" / "lnet_1.pt", unversioned_ok=True)
    cfg.data.canvas = int(checkpoint["canvas"])  # the run's canvas, whatever cells are drawn here
    data = prepare_data(cfg, args.manifest)
    state = checkpoint["model"]
    phase = next(p for p in schedule(cfg) if p.name.startswith("locrefine"))
    lr = args.lr or cfg.train.lr * cfg.train.localizer_refine_lr_scale
    device = torch.device("cpu")
    for gradient in args.gradient:
        cfg.model.box_gradient = gradient
        model = VarifocalNet(cfg.model, cfg.data.input_size)
        model.load_state_dict(state)
        before = validate_phase(model, phase, data.val, device, cfg)["val_type_acc"]
        params = set_trainable(model, phase)
        optimizer = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(args.seed)
        batches = shuffled_batches(len(data.train), cfg.train.batch_size, gen)[:args.batches]
        for b, idx in enumerate(batches):
            x, pol = random_flips(data.train.images[idx].float().div_(255.0), data.train.polarity[idx], gen,
                                  cfg.train.hflip)
            loss = phase_loss(model, phase, x, data.train.labels[idx], pol, cfg, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if b % 40 == 0 or b == len(batches) - 1:
                with torch.no_grad():
                    box = model(x[:1], ("box",))["box"][0].tolist()
                print(f"{gradient:>8} batch {b:4d}: loss {loss.item():.3f}, box (cx, cy, half) "
                      f"({box[0]:.3f}, {box[1]:.3f}, {box[2]:.3f})", flush=True)
        after = validate_phase(copy.deepcopy(model), phase, data.val, device, cfg)["val_type_acc"]
        print(f"{gradient:>8}: L-Net validation type accuracy {before:.4f} -> {after:.4f} "
              f"({len(batches)} batches, Adam lr {lr:g})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
