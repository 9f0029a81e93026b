"""How much a trained karyotype model depends on the chromosome's exact pose on its canvas: type and
polarity accuracy of each head on the run's test rows, plain and under each kind of the training
pose jitter (``holons.finetune.karyotype.data.random_affine``) on its own.

    .venv/bin/python benchmarks/karyotype_pose_probe.py --run RUN_DIR --manifest MANIFEST.csv \\
        [--heads g fusion] [--degrees 10] [--scale 0.05] [--translate 0.05] [--seed 0]

Why: chromosomes are centred on a fixed canvas at training and test time, so a model can read a
chromosome's length from where its ends fall on the grid; a shift jitter at training time takes
that cue away. The table shows which jitter a centred-trained model is sensitive to. The images are
taken as stored (pki-3: all upright), without mirror averaging. Prints one table and writes
``RUN_DIR/pose_probe.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from holons.errors import HolonsError
from holons.eval.results import format_table, json_safe
from holons.files import atomic_write
from holons.finetune.karyotype.data import random_affine
from holons.runs import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from karyotype_reeval import load_run_test, run_arguments, run_heads  # noqa: E402


@torch.no_grad()
def pose_accuracy(model, test, head: str, device, jitter: dict, seed: int, batch_size: int = 256) -> dict:
    """Type / polarity accuracy of ``head`` with every test image jittered by ``jitter`` (seeded)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    right_t = right_p = known_p = 0
    for i in range(0, len(test), batch_size):
        x = test.images[i:i + batch_size].float().div_(255.0)
        if jitter:
            x = random_affine(x, gen, **jitter)
        t, p = model.predict_logits(x.to(device), head)
        y, pol = test.labels[i:i + batch_size], test.polarity[i:i + batch_size]
        right_t += int((t.argmax(1).cpu() == y).sum())
        known = pol >= 0
        right_p += int((p.argmax(1).cpu()[known] == pol[known]).sum())
        known_p += int(known.sum())
    return {"type_accuracy": right_t / max(len(test), 1), "polarity_accuracy": right_p / max(known_p, 1)}


def probe(run: Path, manifest: Path, heads: list[str] | None, *, degrees: float, scale: float,
          translate: float, seed: int = 0, device: str = "auto") -> list[dict]:
    dev = resolve_device(device)
    model, meta, test = load_run_test(run, manifest, dev)
    kinds = {"none": {}, f"rotation +-{degrees:g} deg": {"degrees": degrees},
             f"scale 1 +- {scale:g}": {"scale": scale},
             f"shift +-{translate:g} of the side": {"translate": translate},
             "all three": {"degrees": degrees, "scale": scale, "translate": translate}}
    rows = [{"head": head, "jitter": name, **pose_accuracy(model, test, head, dev, jitter, seed)}
            for head in run_heads(meta, heads) for name, jitter in kinds.items()]
    with atomic_write(run / "pose_probe.json", "w") as f:
        json.dump(json_safe({"run": str(run), "test_chromosomes": len(test), "seed": seed, "rows": rows}), f,
                  indent=2)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = run_arguments(__doc__.splitlines()[0])
    ap.add_argument("--degrees", type=float, default=10.0)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--translate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = probe(args.run, args.manifest, args.heads, degrees=args.degrees, scale=args.scale,
                     translate=args.translate, seed=args.seed, device=args.device)
    except HolonsError as e:
        print(f"karyotype_pose_probe: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, ["head", "jitter", "type_accuracy", "polarity_accuracy"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
