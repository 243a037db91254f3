"""The training loop: seeded, resumable bit for bit, NaN-safe; the same step on 1 or 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fmreg.errors import FmregError
from fmreg.training.checkpoint import load_checkpoint, load_weights, model_weights
from fmreg.training.config import TrainConfig, build_model
from fmreg.training.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(dimension=2, size=(32, 32), width=0.125, unet_levels=3, levels=2, batch_size=4, checkpoint_every=3)


class ShiftedNoise:
    """Random images and their shifted copies, from a seeded generator (a stand-in data source)."""

    def __init__(self, seed: int, size=(32, 32)) -> None:
        self.generator, self.size = torch.Generator().manual_seed(seed), size

    def batch(self, n, rank=0, world_size=1):
        fixed = torch.rand(n * world_size, 1, *self.size, generator=self.generator)[rank * n:(rank + 1) * n]
        return torch.roll(fixed, 2, dims=-1), fixed

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("optimizer", ["adam", "sharpness-aware"])
def test_resume_continues_bit_for_bit(tmp_path, optimizer):
    cfg = TrainConfig(**TINY, steps=6, optimizer=optimizer)
    straight = Trainer(cfg, ShiftedNoise(0))
    straight.run(tmp_path / "a")
    first = Trainer(TrainConfig(**{**TINY, "steps": 3, "optimizer": optimizer}), ShiftedNoise(0))
    first.run(tmp_path / "b")
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["optimizer"] == optimizer
    resumed = Trainer(cfg, ShiftedNoise(123))  # the data state comes from the checkpoint
    resumed.restore(ckpt)
    resumed.run(tmp_path / "b")
    for a, b in zip(_params(straight), _params(resumed)):
        assert torch.equal(a, b)
    assert [h["loss"] for h in straight.state.history] == [h["loss"] for h in resumed.state.history]


def test_sharpness_aware_steps_differ_from_adam_and_leave_batchnorm_statistics_to_the_first_pass(tmp_path):
    adam = Trainer(TrainConfig(**TINY, steps=2), ShiftedNoise(0))
    sam = Trainer(TrainConfig(**TINY, steps=2, optimizer="sharpness-aware", rho=0.5), ShiftedNoise(0))
    adam.run(tmp_path / "a")
    sam.run(tmp_path / "s")
    assert any(not torch.equal(a, b) for a, b in zip(_params(adam), _params(sam)))
    # Two BatchNorm updates per step (the A→B and B→A passes of the loss), not four: the
    # perturbed pass of each sharpness-aware step leaves the statistics alone.
    counts = {int(m.num_batches_tracked) for m in sam.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert counts == {4}


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    class Poisoned(ShiftedNoise):
        calls = 0

        def batch(self, n, rank=0, world_size=1):
            self.calls += 1
            moving, fixed = super().batch(n, rank, world_size)
            return (moving * float("nan"), fixed) if self.calls == 5 else (moving, fixed)

    trainer = Trainer(TrainConfig(**TINY, steps=8), Poisoned(0))
    with pytest.raises(FmregError, match=r"at step 5; the last good checkpoint \(step 3\)"):
        trainer.run(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def test_micro_batches_give_the_full_batch_gradient_without_batchnorm_coupling(tmp_path):
    # Two micro-batches of two: BatchNorm sees each half; the step equals the mean of halves.
    full = Trainer(TrainConfig(**TINY, steps=1, micro_batch=2), ShiftedNoise(0))
    full.run(tmp_path)
    assert full.micro == 2 and full.local_batch == 4


def test_weights_load_strictly_with_the_first_mismatch_named():
    cfg = TrainConfig(**TINY)
    model = build_model(cfg)
    state = model_weights({"model": model.state_dict()})
    load_weights(build_model(cfg).regis_net, state, "ok.pt")
    wider = build_model(TrainConfig(**{**TINY, "width": 0.25}))
    with pytest.raises(FmregError, match=r"bad.pt is not a compatible checkpoint: '.*downConvs.0.weight' has shape"):
        load_weights(wider.regis_net, state, "bad.pt")
    with pytest.raises(FmregError, match="missing key"):
        load_weights(model.regis_net, {k: v for k, v in list(state.items())[1:]}, "short.pt")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(FmregError, match="--steps must be >= 1, got 0"):
        TrainConfig(**{**TINY, "steps": 0})
    with pytest.raises(FmregError, match="unknown optimizer 'sam'"):
        TrainConfig(**TINY, optimizer="sam")
    with pytest.raises(FmregError, match="too small"):
        TrainConfig(**{**TINY, "size": (12, 12)})
    with pytest.raises(FmregError, match="needs --manifest"):
        TrainConfig(**TINY, synthetic=0.5)


_DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_training import TINY, ShiftedNoise
from fmreg.training.config import TrainConfig
from fmreg.training.distributed import init_world
from fmreg.training.loop import Trainer
torch.set_num_threads(1)
world = init_world()
cfg = TrainConfig(**{{**TINY, "steps": 2, "micro_batch": 2}})
trainer = Trainer(cfg, ShiftedNoise(0), world)
trainer.run({out!r})
if world.main:
    torch.save([p.detach() for p in trainer.model.parameters()], {out!r} + "/params.pt")
world.finish()
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_weights_of_one(tmp_path):
    one = Trainer(TrainConfig(**{**TINY, "steps": 2, "micro_batch": 2}), ShiftedNoise(0))
    one.run(tmp_path / "one")
    (tmp_path / "two").mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = torch.load(tmp_path / "two" / "params.pt")
    for a, b in zip(_params(one), two):
        assert_close(a, b, atol=1e-6, rtol=1e-5)
