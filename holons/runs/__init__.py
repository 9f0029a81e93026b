"""The run layer under every trainer (pretraining, karyotyping, fine-tuning): one place for the
run folder, its log, metrics and checkpoints, stop signals and the device.

The whole API, in the order a trainer uses it::

    from holons.runs import (RunLog, StopSignal, prepare_run, resolve_device, save_checkpoint,
                             write_checkpoint, load_checkpoint)

    run = prepare_run(out, resume=resume, overwrite=overwrite)     # folder rules, -> Run
    device = resolve_device(cfg.device)                            # "auto" | "cpu" | "cuda:1" ...
    with RunLog(run.dir, logging.getLogger("holons.x"), tensorboard=cfg.tensorboard) as record:
        if run.cleared:
            record.log.warning("... had no checkpoint; cleared its leftovers %s", run.cleared)
        with StopSignal() as stop:                                 # SIGTERM / Ctrl-C -> stop.requested
            ...
            record.metrics({"step": step, "loss": loss})           # metrics.jsonl (+ TensorBoard)
            save_checkpoint(state, run.checkpoints, step, keep_last=3)  # step_XXXXXXXX.pt, rotated
            # or write_checkpoint(state, run.checkpoints / "phase.pt") for named checkpoints

- ``prepare_run(out, *, resume=False, overwrite=False, leftovers=(), results=()) -> Run``: a new
  or empty folder is a fresh run; a folder with a checkpoint is refused (one line naming
  ``--resume`` / ``--overwrite``); one without a checkpoint, holding only what a run writes before
  its first checkpoint, is cleared and reused (``Run.cleared``: log a warning); ``resume`` needs a
  checkpoint; ``overwrite`` clears a run's files and refuses a folder holding anything else.
  ``has_checkpoint(folder)`` tells a caller whether ``--resume`` applies.
- ``RunLog(folder, logger, *, active, echo, tensorboard, announce, resume_step)``: ``train.log``
  + console, ``metrics.jsonl``, TensorBoard (the optional extra; ``TENSORBOARD_INSTALL``).
- Checkpoints hold tensors and primitives only (``weights_only=True`` loads them) and carry
  ``format``, ``versions`` (holons, torch, timm, numpy, python) and ``git_commit``:
  ``save_checkpoint`` / ``list_checkpoints`` / ``latest_checkpoint`` / ``resolve_checkpoint``
  (step-numbered, rotated), ``write_checkpoint`` (named), ``load_checkpoint``,
  ``capture_rng_state`` / ``restore_rng_state`` (bit-exact CPU resume).
- ``changed_keys(old, new, ignore)``: the config keys a resumed run changed.
- ``resolve_device(name, *, local_rank=None)``, ``progress_enabled(progress)``, ``StopSignal``.

Spelling, everywhere: Python keyword arguments ``resume: bool = False, overwrite: bool = False``;
CLI flags ``--resume`` / ``--overwrite``.
"""

from holons.runs.checkpoints import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    checkpoint_path,
    git_commit,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    provenance,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    versions,
    write_checkpoint,
)
from holons.runs.device import resolve_device
from holons.runs.folder import (
    CHECKPOINTS,
    RUN_ENTRIES,
    Run,
    changed_keys,
    checkpoint_files,
    has_checkpoint,
    prepare_run,
)
from holons.runs.log import TENSORBOARD_INSTALL, RunLog, open_tensorboard, progress_enabled
from holons.signals import StopSignal

__all__ = [
    "CHECKPOINTS", "CHECKPOINT_FORMAT", "RUN_ENTRIES", "TENSORBOARD_INSTALL", "Run", "RunLog", "StopSignal",
    "capture_rng_state", "changed_keys", "checkpoint_files", "checkpoint_path", "git_commit",
    "has_checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "open_tensorboard",
    "prepare_run", "progress_enabled", "provenance", "resolve_checkpoint", "resolve_device",
    "restore_rng_state", "save_checkpoint", "versions", "write_checkpoint",
]
