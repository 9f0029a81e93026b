"""The four-step Varifocal schedule, each step resumable from atomic checkpoints.

Steps (phases, in order; a phase with 0 epochs is skipped):

1. ``gnet``: G-Net backbone + type and polarity heads, CE(type) + w * CE(polarity).
2. ``localizer``: the localizer alone, smooth-L1 to the centred square covering the chromosome.
3. ``lnet_r`` / ``locrefine_r`` for r = 1..rounds: the L-Net on the zoomed crop with the localizer
   frozen, then the localizer from the L-Net's loss with the L-Net frozen (gradient through the
   soft box mask).
4. ``fusion``: the two fusion MLPs on the concatenated (frozen) G and L features.

Every phase has its own Adam (lr, x gamma every ``lr_step_epochs`` epochs, or a cosine decay). After
each epoch the whole state (weights, optimizer, scheduler, epochs done) is written atomically to
``checkpoints/<phase>.pt`` (tensors and primitives only). Shuffling and augmentation draw from
generators seeded by (seed, phase, epoch), so a resumed run repeats what an uninterrupted one
would have done. Frozen modules run in eval mode (BatchNorm statistics stay put).

The run folder, its log, metrics and checkpoints follow the run layer (``holons.runs``, shared with
pretraining): a folder holding a checkpoint is refused without ``resume`` / ``overwrite``; the
leftovers of a run that failed before its first checkpoint are cleared and the folder reused.

SIGTERM or SIGINT during training sets a flag (``holons.runs.StopSignal``); at the
next batch boundary the phase's checkpoint is written with the position inside the epoch (batches
done, the epoch generator's state, the running loss; at an epoch's end it is the ordinary epoch
checkpoint), :class:`KaryotypeInterrupted` is raised and the previous signal handlers are back.
``resume=True`` (CLI ``--resume``) continues from that batch exactly as the uninterrupted run
would have (bit-identical on CPU).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from holons.config import save_config, to_dict
from holons.errors import HolonsError
from holons.files import atomic_write
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.data import (
    FOREGROUND_THRESHOLD,
    KaryotypeDataset,
    assign_splits,
    fit_preprocessing,
    load_table,
    random_affine,
    random_flips,
    read_crops,
)
from holons.finetune.karyotype.evaluate import evaluate_split
from holons.finetune.karyotype.inference import predict_dataset
from holons.finetune.karyotype.losses import phase_loss
from holons.finetune.karyotype.model import VarifocalNet, box_targets
from holons.finetune.karyotype.model_folder import MODEL_DIR, save_model
from holons.finetune.karyotype.preprocess import Preprocessing
from holons.finetune.karyotype.schedule import Phase, final_head, schedule, trained_heads
from holons.runs import (
    RunLog,
    StopSignal,
    changed_keys,
    load_checkpoint,
    prepare_run,
    progress_enabled,
    resolve_device,
    write_checkpoint,
)

log = logging.getLogger("holons.karyotype")
LEFTOVERS = ("split.csv",)  # written before the first checkpoint, with the run layer's entries
RESULTS = (MODEL_DIR, "eval")  # what a finished run adds


# --------------------------------------------------------------------------- interruption
class KaryotypeInterrupted(HolonsError):
    """Training stopped by SIGTERM / SIGINT after writing its state; ``resume=True`` continues it."""

    def __init__(self, signum: int, where: str, checkpoint: Path) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name} {where}; state saved to "
                         f"{checkpoint}; continue with the same command plus --resume")


def set_trainable(model: VarifocalNet, phase: Phase) -> list[torch.nn.Parameter]:
    """Unfreeze (and put in train mode) the sub-nets ``phase`` trains, freeze the rest; return the
    parameters to optimize."""
    params = []
    for name, module in model.named_children():
        on = name in phase.trains
        module.train(on)
        for p in module.parameters():
            p.requires_grad_(on)
        if on:
            params.extend(module.parameters())
    return params


def _refine_guard(model: VarifocalNet, phase: Phase, val: KaryotypeDataset, device, cfg: KaryotypeConfig,
                  state: dict | None) -> dict | None:
    """For a localizer refinement with ``refine_keep_if_better``: the L-Net's validation accuracy
    and the localizer weights before it, so a refinement that lowers the accuracy is undone."""
    if not (phase.name.startswith("locrefine") and cfg.train.refine_keep_if_better and len(val)):
        return None
    if state is not None and "guard_baseline" in state:
        return {"baseline": float(state["guard_baseline"]), "localizer": state["guard_localizer"]}
    baseline = validate_phase(model, phase, val, device, cfg)["val_type_acc"]
    log.info("%s: L-Net validation type accuracy before refinement %.4f", phase.name, baseline)
    return {"baseline": baseline,
            "localizer": {k: v.detach().clone() for k, v in model.localizer.state_dict().items()}}


def _save_checkpoint(path: Path, model, optimizer, scheduler, phase: Phase, epochs_done: int,
                     cfg: KaryotypeConfig, canvas: int, guard: dict | None = None,
                     position: dict | None = None) -> None:
    """The phase's resume state; ``position`` (``batches_done``, ``generator``, ``loss_total``,
    ``loss_count``) marks a checkpoint written inside epoch ``epochs_done + 1`` on interruption."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "phase": phase.name, "epochs_done": epochs_done, "done": epochs_done >= phase.epochs,
        "config": to_dict(cfg), "canvas": canvas,
    }
    if guard is not None:
        state["guard_baseline"], state["guard_localizer"] = guard["baseline"], guard["localizer"]
    if position is not None:
        state.update(position)
    write_checkpoint(state, path)


# --------------------------------------------------------------------------- data
@dataclass
class PreparedData:
    train: KaryotypeDataset
    val: KaryotypeDataset
    test: KaryotypeDataset
    preprocessing: Preprocessing
    skipped: dict

    @property
    def canvas(self) -> int:
        return self.preprocessing.canvas


def prepare_data(cfg: KaryotypeConfig, manifest: str | Path, progress: bool = False) -> PreparedData:
    """Read the manifest, split by group, cut every chromosome out once, fit the preprocessing
    (canvas, reference length) on the training rows, and make the three datasets."""
    d = cfg.data
    table, skipped = load_table(manifest, default_polarity=d.default_polarity)
    table = table[table["label"] >= 0].reset_index(drop=True)
    if table.empty:
        raise HolonsError(f"{manifest}: no labelled chromosomes to train on")
    table["split"] = assign_splits(table["group"], test_fraction=d.test_fraction, val_fraction=d.val_fraction,
                                   seed=d.split_seed, folds=d.folds, fold=d.fold)
    if d.max_train_cases:
        cases = np.unique(table.loc[table["split"] == "train", "case_id"])
        keep = set(np.random.default_rng([d.split_seed, 0xCA5E]).permutation(cases)[: d.max_train_cases])
        table = table[(table["split"] != "train") | table["case_id"].isin(keep)].reset_index(drop=True)
    crops = read_crops(table, d.stain, progress=progress)
    split = crops.table["split"].to_numpy()
    prep = fit_preprocessing(crops.subset(split == "train"), stain=d.stain, canvas=d.canvas,
                             percentile=d.canvas_percentile, scale=d.scale)
    parts = {name: KaryotypeDataset(crops.subset(split == name), preprocessing=prep, size=d.source_size)
             for name in ("train", "val", "test")}
    data = PreparedData(parts["train"], parts["val"], parts["test"], prep, dict(skipped))
    if len(data.train) < 2:
        raise HolonsError("fewer than 2 training chromosomes after the split")
    for _, reason in crops.skipped:
        data.skipped[reason] = data.skipped.get(reason, 0) + 1
    return data


# --------------------------------------------------------------------------- loop
def shuffled_batches(n: int, batch: int, generator: torch.Generator, steps: int = 0) -> list[torch.Tensor]:
    """One epoch of index batches in a random order; a last batch of one (BatchNorm) is dropped.

    ``steps`` > 0: exactly that many batches, from as many reshuffled passes as needed (each pass
    a fresh permutation, batches never straddle two passes, so no chromosome is twice in a batch).
    """
    batches: list[torch.Tensor] = []
    while True:
        order = torch.randperm(n, generator=generator)
        batches += [order[i:i + batch] for i in range(0, n, batch) if len(order[i:i + batch]) >= 2]
        if not steps or len(batches) >= steps:
            return batches[:steps] if steps else batches


def best_head(model: VarifocalNet, cfg: KaryotypeConfig, val: KaryotypeDataset,
              device: torch.device) -> tuple[str, dict]:
    """The trained head with the best validation type accuracy (test-time flips as configured),
    and every head's accuracy.

    An average of two heads is only as good as its weaker member lets it be: a sub-net that failed
    (say, an L-Net whose crops miss the chromosome on another lab's framing) makes the ``mean``
    head's per-chromosome argmax collapse, while per-case dispatch, which reads relative
    probabilities, still looks fine. Choosing on validation catches that.
    """
    heads = trained_heads(cfg)
    if len(val) == 0:
        return heads[0], {}
    probs = {head: predict_dataset(model, val, head, device, cfg.train.eval_batch_size,
                                   hflip=cfg.train.test_time_hflip, vflip=cfg.train.test_time_vflip)[0]
             for head in heads if head != "mean"}
    if "mean" in heads:  # the average of the G and L probabilities, view by view: no third pass
        probs["mean"] = (probs["g"] + probs["l"]) / 2
    scores = {head: float((probs[head].argmax(1) == val.labels).float().mean()) for head in heads}
    return max(heads, key=lambda h: scores[h]), scores


def _head_of(phase: Phase) -> str | None:
    return {"g": "g", "l": "l", "fusion": "fusion"}.get(phase.loss)


def train_karyotype(cfg: KaryotypeConfig, manifest: str | Path, out: str | Path, *, resume: bool = False,
                    overwrite: bool = False, progress: bool | None = None) -> dict:
    """Train the configured model on ``manifest``, save it to ``out/model``, evaluate on the test split.

    Returns the evaluation summary (also in ``out/eval/metrics.json``). Raises
    :class:`KaryotypeInterrupted` after saving the state when SIGTERM / SIGINT arrives during
    training; ``resume=True`` then continues from the batch where it stopped.
    """
    out = Path(out)
    run = prepare_run(out, resume=resume, overwrite=overwrite, leftovers=LEFTOVERS, results=RESULTS)
    progress = progress_enabled(progress)
    with RunLog(out, log, echo=logging.WARNING if progress else logging.INFO) as record:
        if run.cleared:
            log.warning("run folder %s had no checkpoint (a run that stopped before its first one); cleared "
                        "its leftovers (%s) and starting a new run", out, ", ".join(run.cleared))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = resolve_device(cfg.train.device)
        if device.type == "cuda":  # fixed input sizes: cuDNN may time its kernels once and keep the fastest
            torch.backends.cudnn.benchmark = True
        _check_resumed_config(cfg, run.config_file, resume)
        final_head(cfg)  # a head the schedule cannot train stops the run before any work
        save_config(cfg, run.config_file)
        t0 = time.perf_counter()
        data = prepare_data(cfg, manifest, progress=progress)
        log.info("data: train %d, val %d, test %d chromosomes; canvas %d px (%.1f th percentile of the "
                 "training chromosomes' lengths; %d shrunk to fit); scale %s; skipped %s (%.0f s)",
                 len(data.train), len(data.val), len(data.test), data.canvas,
                 data.preprocessing.canvas_percentile, data.train.report.shrunk, data.preprocessing.scale,
                 data.skipped, time.perf_counter() - t0)
        _write_split(out / "split.csv", data)
        with StopSignal() as stop:
            model = _train_phases(cfg, data, device, run.checkpoints, record, stop, progress)
        head, head_scores = final_head(cfg), {}
        if head == "best":
            head, head_scores = best_head(model, cfg, data.val, device)
            log.info("head chosen on validation: %s (type accuracy %s)", head,
                     ", ".join(f"{h} {a:.4f}" for h, a in head_scores.items()))
        save_model(model, cfg, data.preprocessing, head, out / MODEL_DIR)
        summary = evaluate_split(model, data.test, head, device, out / "eval", dispatch=cfg.dispatch,
                                 seed=cfg.data.split_seed, batch_size=cfg.train.eval_batch_size,
                                 hflip=cfg.train.test_time_hflip, vflip=cfg.train.test_time_vflip)
        summary.update({"train_chromosomes": len(data.train), "val_chromosomes": len(data.val),
                        "val_type_accuracy_by_head": head_scores,
                        "canvas": data.canvas, "shrunk_to_fit_canvas": {
                            name: part.report.shrunk for name, part in
                            (("train", data.train), ("val", data.val), ("test", data.test))},
                        "skipped": data.skipped,
                        "train_seconds": round(time.perf_counter() - t0, 1)})
        if cfg.train.dispatcher_steps:
            summary.update(_fit_dispatcher(model, cfg, data, head, device, out))
        with atomic_write(out / "eval" / "metrics.json", "w") as f:
            json.dump(summary, f, indent=2)
        log.info("test: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
        return summary


def _fit_dispatcher(model: VarifocalNet, cfg: KaryotypeConfig, data: PreparedData, head: str,
                    device: torch.device, out: Path) -> dict:
    """``train.dispatcher_steps``: fit the learned dispatcher on the run's own data (already in
    memory) and return its test metrics under ``label_metrics``' names."""
    from holons.finetune.karyotype.dispatch import LEARNED_METHODS
    from holons.finetune.karyotype.fit_dispatch import fit_on_datasets

    datasets = {"train": data.train, "val": data.val, "test": data.test}
    report = fit_on_datasets(model, datasets, out / MODEL_DIR, out / "eval", head=head,
                             hflip=cfg.train.test_time_hflip, vflip=cfg.train.test_time_vflip,
                             batch_size=cfg.train.eval_batch_size, steps=cfg.train.dispatcher_steps,
                             seed=cfg.train.seed, device=device)
    found = {"dispatcher_val_accuracy": report["val_accuracy"]}
    for method in LEARNED_METHODS:
        for key, value in report["methods"].get(method, {}).items():
            found[f"{key}_{method}"] = value
    return found


def _train_phases(cfg: KaryotypeConfig, data: PreparedData, device: torch.device, ckpt_dir: Path,
                  record: RunLog, stop: StopSignal, progress: bool) -> VarifocalNet:
    """Run (or resume) every phase of the schedule; on a stop request checkpoint and raise."""
    from tqdm import tqdm

    torch.manual_seed(cfg.train.seed)
    model = VarifocalNet(cfg.model, cfg.data.input_size).to(device)
    augment = cfg.train.augment_degrees > 0 or cfg.train.augment_scale > 0 or cfg.train.augment_translate > 0
    for index, phase in enumerate(schedule(cfg)):
        path = ckpt_dir / f"{phase.name}.pt"
        # checkpoints written before holons.runs carry no format; runs in progress still resume
        state = load_checkpoint(path, unversioned_ok=True) if path.exists() else None
        if state is not None and state["done"]:
            model.load_state_dict(state["model"])
            continue
        params = set_trainable(model, phase)
        refine = phase.name.startswith("locrefine")
        lr = cfg.train.lr * (cfg.train.localizer_refine_lr_scale if refine else 1.0)
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=cfg.train.weight_decay)
        scheduler = _lr_scheduler(optimizer, phase, cfg)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["epochs_done"])
            inside = f", after batch {state['batches_done']}" if "batches_done" in state else ""
            log.info("resume %s after epoch %d%s", phase.name, start, inside)
        guard = _refine_guard(model, phase, data.val, device, cfg, state)
        for epoch in range(start, phase.epochs):
            set_trainable(model, phase)
            te = time.perf_counter()
            gen = torch.Generator().manual_seed(int(cfg.train.seed * 1_000_003 + index * 1009 + epoch))
            total, count = 0.0, 0
            batches = shuffled_batches(len(data.train), cfg.train.batch_size, gen, cfg.train.epoch_steps)
            warmup = min(cfg.train.warmup_steps, len(batches))
            done = 0
            if state is not None and epoch == start and "batches_done" in state:  # resumed mid-epoch
                done = int(state["batches_done"])
                gen.set_state(state["generator"])
                total, count = float(state["loss_total"]), int(state["loss_count"])
            for b, idx in enumerate(tqdm(batches[done:], desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                                         initial=done, total=len(batches), leave=False,
                                         disable=not progress), start=done + 1):
                if epoch == 0 and b <= warmup:  # linear warm-up: the phase's lr again after `warmup` batches
                    for group in optimizer.param_groups:
                        group["lr"] = group["initial_lr"] * b / warmup
                # the batch goes to the device as uint8 and is augmented there: on a GPU the flips and
                # the affine resampling at zoom-source size would otherwise bound the loop on the CPU
                x = data.train.images[idx].to(device).float().div_(255.0)
                x, pol = random_flips(x, data.train.polarity[idx].to(device), gen, cfg.train.hflip)
                if augment:
                    x = random_affine(x, gen, degrees=cfg.train.augment_degrees,
                                      scale=cfg.train.augment_scale, translate=cfg.train.augment_translate)
                loss = phase_loss(model, phase, x, data.train.labels[idx].to(device), pol, cfg, gen)
                if not torch.isfinite(loss):
                    raise HolonsError(f"{phase.name}: loss became {loss.item()} at epoch {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                count += len(idx)
                if len(batches) >= 200 and b % 100 == 0:
                    log.info("%s epoch %d: %d/%d chromosomes, loss %.4f, %.0f s", phase.name, epoch + 1,
                             count, len(data.train), total / count, time.perf_counter() - te)
                if stop.requested and b < len(batches):  # at the epoch's end: the epoch checkpoint
                    position = {"batches_done": b, "generator": gen.get_state(), "loss_total": total,
                                "loss_count": count}
                    _save_checkpoint(path, model, optimizer, scheduler, phase, epoch, cfg, data.canvas, guard,
                                     position)
                    _interrupted(stop, f"in {phase.name} epoch {epoch + 1}/{phase.epochs} after batch "
                                 f"{b}/{len(batches)}", path)
            lr_used = optimizer.param_groups[0]["lr"]  # the epoch's lr (after any warm-up), before the decay
            scheduler.step()
            line = {"phase": phase.name, "epoch": epoch + 1, "loss": total / max(count, 1),
                      "lr": lr_used, "seconds": round(time.perf_counter() - te, 2)}
            every = cfg.train.val_every
            if epoch + 1 == phase.epochs or (every and (epoch + 1) % every == 0) or guard:
                line.update(validate_phase(model, phase, data.val, device, cfg))
            if guard and epoch + 1 == phase.epochs and line["val_type_acc"] < guard["baseline"]:
                model.localizer.load_state_dict(guard["localizer"])
                line["reverted_to_val_type_acc"] = guard["baseline"]
            record.metrics(line)
            log.info(json.dumps(line))
            _save_checkpoint(path, model, optimizer, scheduler, phase, epoch + 1, cfg, data.canvas, guard)
            if stop.requested:
                _interrupted(stop, f"after {phase.name} epoch {epoch + 1}/{phase.epochs}", path)
    return model


def _lr_scheduler(optimizer: torch.optim.Optimizer, phase: Phase, cfg: KaryotypeConfig):
    """The per-epoch lr schedule of one phase (``train.lr_schedule``)."""
    if cfg.train.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(phase.epochs, 1))
    return torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.lr_step_epochs, cfg.train.lr_gamma)


def _interrupted(stop: StopSignal, where: str, checkpoint: Path) -> None:
    error = KaryotypeInterrupted(stop.signum or signal.SIGTERM, where, checkpoint)
    log.warning("%s", error)
    raise error


def validate_phase(model: VarifocalNet, phase: Phase, val: KaryotypeDataset, device: torch.device,
                   cfg: KaryotypeConfig) -> dict:
    """Validation metrics of ``phase``'s head: box L1 for the localizer, type and polarity accuracy
    (on a fixed half of the cells turned upside down) for the classifying phases."""
    if len(val) == 0:
        return {}
    if phase.loss == "box":
        model.eval()
        with torch.no_grad():
            boxes = []
            for i in range(0, len(val), cfg.train.eval_batch_size):
                x = val.images[i:i + cfg.train.eval_batch_size].float().div_(255.0).to(device)
                boxes.append(F.l1_loss(model(x, ("box",))["box"], box_targets(x, FOREGROUND_THRESHOLD),
                                       reduction="sum").item())
        return {"val_box_l1": sum(boxes) / (3 * len(val))}
    flips = torch.rand(len(val), generator=torch.Generator().manual_seed(cfg.data.split_seed)) < 0.5
    types, pols = predict_dataset(model, val, _head_of(phase), device, cfg.train.eval_batch_size, flips,
                                  hflip=cfg.train.test_time_hflip, vflip=cfg.train.test_time_vflip)
    pol = torch.where(flips & (val.polarity >= 0), 1 - val.polarity, val.polarity)
    known = pol >= 0
    pol_acc = float((pols.argmax(1)[known] == pol[known]).float().mean()) if known.any() else None
    type_acc = float((types.argmax(1) == val.labels).float().mean())
    return {"val_type_acc": type_acc, "val_polarity_acc": pol_acc}


def _check_resumed_config(cfg: KaryotypeConfig, saved: Path, resume: bool) -> None:
    """A resumed run must use the configuration it was started with (keys the saved config does
    not know, added to holons since, take their defaults)."""
    import yaml

    if not (resume and saved.is_file()):
        return
    changed = changed_keys(yaml.safe_load(saved.read_text()), to_dict(cfg))
    if changed:
        raise HolonsError(f"--resume with a different config than the run's ({', '.join(changed)}); "
                          "start a new run folder instead")


def _write_split(path: Path, data: PreparedData) -> None:
    import pandas as pd

    rows = [part.table.assign(split=name)[["path", "case_id", "group", "split"]]
            for name, part in (("train", data.train), ("val", data.val), ("test", data.test))]
    with atomic_write(path, "w") as f:
        pd.concat(rows).to_csv(f, index=False)
