"""The ``perf`` throughput knobs on CPU: each runs, and leaves the numbers equal (teacher inference
mode, uint8 transfer, prefetch, a compile that fails and falls back) or within float rounding
(channels_last, foreach / fused AdamW, compiled forwards) of the reference step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from pretrain_fixtures import tiny_config, write_phantoms

from holons.ssl.stream import BatchStream, ImageFolderDataset
from holons.ssl.trainer import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = [{"mode": "localizability", "levels": [0], "steps_per_level": 2},
          {"mode": "part_whole", "levels": [0], "steps_per_level": 2}]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf")
    images = write_phantoms(root / "phantoms", n=16)
    # no warm-up and a floor under the cosine: each of the 4 steps moves the weights (by ~lr, Adam)
    cfg = tiny_config(images, STAGES, optim={"warmup_epochs": 0.0, "min_lr": 1e-4})
    torch.set_num_threads(1)
    init = pretrain({**cfg, "max_steps": 0}, root / "init").student.state_dict()
    run = pretrain(cfg, root / "reference")
    return {"cfg": cfg, "images": images, "init": init, "weights": run.student.state_dict(),
            "teacher": run.teacher.state_dict(), "losses": _losses(root / "reference")}


def _run_with(reference, tmp_path, **perf):
    cfg = {**reference["cfg"], "perf": perf}
    result = pretrain(cfg, tmp_path / "run")
    assert result.status == "finished" and result.step == 4
    return result, _losses(tmp_path / "run")


@pytest.mark.parametrize("perf", [{"teacher_inference_mode": True}, {"uint8_transfer": True}, {"prefetch": 2},
                                  {"teacher_inference_mode": True, "uint8_transfer": True, "prefetch": 1,
                                   "lazy_timing": True}])
def test_knobs_that_leave_the_numbers_equal(reference, tmp_path, perf):
    result, losses = _run_with(reference, tmp_path, **perf)
    assert losses == reference["losses"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time_fwd_bwd"] > 0 and r["img_per_s"] > 0 for r in rows)
    for name, w in result.student.state_dict().items():
        assert torch.equal(w, reference["weights"][name]), name
    for name, w in result.teacher.state_dict().items():
        assert torch.equal(w, reference["teacher"][name]), name


@pytest.mark.parametrize("perf", [{"channels_last": True}, {"adamw": "foreach"}, {"adamw": "fused"}])
def test_knobs_within_float_rounding(reference, tmp_path, perf):
    result, losses = _run_with(reference, tmp_path, **perf)
    _assert_close(result.student.state_dict(), losses, reference)


def _assert_close(weights, losses, reference) -> None:
    """Another summation order (NHWC convolutions, multi-tensor / fused AdamW kernels) moves float32
    results by ~1e-7 relative per operation: 1e-4 on the loss after a few steps leaves a wide margin
    while a different batch, view or update would move it by 1e-2 or more. Weights: a flipped
    update sign (Adam's first steps are ~lr * sign(grad)) would differ by about the whole movement,
    so the gap must stay below 5 % of how far the weights moved."""
    for a, b in zip(losses, reference["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    one, init = reference["weights"], reference["init"]
    gap = max((weights[n].float() - one[n].float()).abs().max().item() for n in one)
    moved = max((weights[n].float() - init[n].float()).abs().max().item() for n in one)
    assert moved > 1e-4 and gap < 0.05 * moved, (gap, moved)


@pytest.mark.slow
def test_compiled_forwards_match_the_eager_step(reference, tmp_path):
    torch._dynamo.reset()
    result, losses = _run_with(reference, tmp_path, compile=True, compile_backend="eager")
    _assert_close(result.student.state_dict(), losses, reference)


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no C compiler on this machine")


def test_a_failing_compile_logs_one_warning_and_runs_uncompiled(reference, tmp_path, caplog):
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "holons_test_broken" not in _BACKENDS:
        register_backend(_broken_backend, name="holons_test_broken")
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="holons.pretrain"):
        result, losses = _run_with(reference, tmp_path, compile=True, compile_backend="holons_test_broken")
    warnings = [r for r in caplog.records if "perf.compile" in r.getMessage()]
    assert len(warnings) == 1 and "continuing uncompiled" in warnings[0].getMessage()
    assert losses == reference["losses"]
    for name, w in result.student.state_dict().items():
        assert torch.equal(w, reference["weights"][name]), name


def test_prefetched_stream_yields_the_same_batches_and_passes_errors_on(reference):
    ds = ImageFolderDataset(reference["images"], 64, as_stored=True)
    assert ds[0].dtype == torch.uint8
    plain = BatchStream(ds, 4, seed=1, rank=0, world=1, num_workers=0, start_step=3, pin_memory=False)
    ahead = BatchStream(ds, 4, seed=1, rank=0, world=1, num_workers=0, start_step=3, pin_memory=False,
                        prefetch=3)
    for _ in range(9):  # over two epoch boundaries
        assert torch.equal(plain.next(), ahead.next())
    ahead.close()

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> torch.Tensor:
            raise OSError("disk gone")

    broken = BatchStream(Unreadable(), 4, seed=1, rank=0, world=1, num_workers=0, start_step=0,
                         pin_memory=False, prefetch=2)
    with pytest.raises(OSError, match="disk gone"):
        broken.next()
