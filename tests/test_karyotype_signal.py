"""Karyotype training stops cleanly on SIGTERM / SIGINT and ``--resume`` finishes the same model."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from holons.cli import main as cli_main
from holons.config import load_config
from holons.data.synthetic.karyotypes import generate_karyotypes
from holons.finetune.karyotype import train as karyotype_train
from holons.finetune.karyotype.config import KaryotypeConfig
from holons.finetune.karyotype.train import KaryotypeInterrupted, prepare_data, train_karyotype

TINY = "configs/finetune/karyotype_cpu_tiny.yaml"
# the whole four-step schedule, two L-Net epochs, CutMix and pose jitter on (they draw from the epoch
# generator)
OVERRIDES = ["model.variant=varifocal", "data.input_size=32", "train.gnet_epochs=1", "train.lnet_epochs=2",
             "train.fusion_epochs=1", "train.cutmix_prob=0.5", "train.batch_size=16",
             "train.augment_degrees=10", "train.augment_scale=0.05", "train.augment_translate=0.05"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("karyo_signal")
    return generate_karyotypes(out / "syn", cases=8, seed=0, abnormal_rate=0.2, flip_rate=0.5, workers=1)


@pytest.fixture(scope="module")
def per_epoch(manifest) -> int:
    """Training batches per epoch (a last batch of fewer than 2 is dropped)."""
    n = len(prepare_data(load_config(KaryotypeConfig, TINY, OVERRIDES), manifest).train)
    return n // 16 + (n % 16 >= 2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _signal_at_batch(monkeypatch, call: int, *signums: int) -> None:
    """Send ``signums`` to this process while the ``call``-th training batch is being prepared."""
    real = karyotype_train.random_flips
    calls = {"n": 0}

    def flips(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(karyotype_train, "random_flips", flips)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


@pytest.mark.slow
def test_sigterm_checkpoints_mid_epoch_and_resume_matches_uninterrupted(manifest, per_epoch, tmp_path,
                                                                        monkeypatch, capsys):
    reference = tmp_path / "reference"
    expected = train_karyotype(load_config(KaryotypeConfig, TINY, OVERRIDES), manifest, reference)

    run = tmp_path / "run"
    command = ["karyotype", "train", "--config", TINY, "--data", str(manifest), "--out", str(run), *OVERRIDES]
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # phases G-Net (1 epoch), localizer (1), L-Net (2): stop in the L-Net's second epoch, batch 5
    _signal_at_batch(monkeypatch, 3 * per_epoch + 5, signal.SIGTERM)
    assert cli_main(command) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"interrupted by SIGTERM in lnet_1 epoch 2/2 after batch 5/{per_epoch}" in err
    assert f"--out {run} --resume" in err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not (run / "model").exists()
    state = torch.load(run / "checkpoints" / "lnet_1.pt", weights_only=True)
    assert not state["done"] and state["epochs_done"] == 1 and state["batches_done"] == 5
    assert "interrupted by SIGTERM" in (run / "train.log").read_text()
    monkeypatch.undo()

    assert cli_main([*command, "--resume"]) == 0
    got = json.loads((run / "eval" / "metrics.json").read_text())
    for key in ("type_accuracy", "polarity_accuracy", "macro_f1", "case_accuracy_optimal"):
        assert got[key] == expected[key]
    want, have = load_file(str(reference / "model" / "model.safetensors")), load_file(str(run / "model" /
                                                                                          "model.safetensors"))
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    # the interrupted epoch is recorded once, with the uninterrupted run's mean loss
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _records(reference)]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _records(run)] == strip


def test_sigint_stops_at_phase_end_and_second_sigint_forces(manifest, per_epoch, tmp_path, monkeypatch):
    cfg = load_config(KaryotypeConfig, TINY, OVERRIDES)
    before = signal.getsignal(signal.SIGINT)
    _signal_at_batch(monkeypatch, per_epoch, signal.SIGINT)  # the last batch of the G-Net's only epoch
    with pytest.raises(KaryotypeInterrupted) as info:
        train_karyotype(cfg, manifest, tmp_path / "run")
    assert info.value.signum == signal.SIGINT and "SIGINT after gnet epoch 1/1" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is before
    state = torch.load(tmp_path / "run" / "checkpoints" / "gnet.pt", weights_only=True)
    assert state["done"] and "batches_done" not in state  # the ordinary end-of-epoch checkpoint
    assert not (tmp_path / "run" / "checkpoints" / "localizer.pt").exists()
    monkeypatch.undo()
    summary = train_karyotype(cfg, manifest, tmp_path / "run", resume=True)
    assert summary["head"] == "fusion" and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert [r["phase"] for r in _records(tmp_path / "run")][:2] == ["gnet", "localizer"]

    # an impatient second Ctrl-C does not wait for the batch boundary
    _signal_at_batch(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_karyotype(cfg, manifest, tmp_path / "forced")
    assert signal.getsignal(signal.SIGINT) is before


def _record_lrs(monkeypatch) -> list[float]:
    """The lr of every Adam step taken from now on."""
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return seen


def test_warmup_raises_the_lr_linearly_in_each_phase_first_epoch(manifest, per_epoch, tmp_path, monkeypatch):
    seen = _record_lrs(monkeypatch)
    extra = ["model.variant=g_only", "train.gnet_epochs=2", "train.cutmix_prob=0", "train.warmup_steps=4",
             "train.lr=0.002"]
    cfg = load_config(KaryotypeConfig, TINY, [*OVERRIDES, *extra])
    train_karyotype(cfg, manifest, tmp_path / "run")
    assert len(seen) == 2 * per_epoch and per_epoch > 4
    assert seen[:4] == pytest.approx([0.0005, 0.001, 0.0015, 0.002])
    assert seen[4:] == pytest.approx([0.002] * (2 * per_epoch - 4))  # the second epoch has no warm-up


def test_cosine_schedule_after_warmup(manifest, per_epoch, tmp_path, monkeypatch):
    seen = _record_lrs(monkeypatch)
    extra = ["model.variant=g_only", "train.gnet_epochs=3", "train.cutmix_prob=0", "train.warmup_steps=2",
             "train.lr=0.002", "train.lr_schedule=cosine"]
    cfg = load_config(KaryotypeConfig, TINY, [*OVERRIDES, *extra])
    train_karyotype(cfg, manifest, tmp_path / "run")
    assert len(seen) == 3 * per_epoch
    assert seen[:2] == pytest.approx([0.001, 0.002])
    for epoch, factor in enumerate((1.0, 0.75, 0.25)):  # (1 + cos(pi * epoch / 3)) / 2
        assert seen[epoch * per_epoch + 2:(epoch + 1) * per_epoch] == pytest.approx(
            [0.002 * factor] * (per_epoch - 2))
    # metrics.jsonl records the lr each epoch ran at
    assert [r["lr"] for r in _records(tmp_path / "run")] == pytest.approx([0.002, 0.0015, 0.0005])
