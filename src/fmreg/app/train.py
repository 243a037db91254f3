"""``fmreg train``: train or fine-tune a GradICON network; checkpoints, ``loss.png``, ``model.json``.

RUN_DIR holds one run: ``checkpoint.pt`` (atomic, every ``checkpoint_every`` steps),
``loss.png`` (the loss terms against the step) and ``model.json`` (the card: data, command,
optimizer, steps, wall time, machine, validation scores). A RUN_DIR that holds another run is
refused unless ``--resume`` (continue it) or ``--overwrite`` (start over) says what to do.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fmreg import __version__
from fmreg.app.common import Log, stderr_log
from fmreg.errors import FmregError
from fmreg.io.outputs import atomic_path, check_writable, dump_json
from fmreg.io.paths import absolute
from fmreg.training.checkpoint import CHECKPOINT, load_checkpoint, load_weights, model_weights
from fmreg.training.config import TrainConfig
from fmreg.training.data import make_pair_source
from fmreg.training.distributed import World, init_world
from fmreg.training.loop import Trainer

#: Files a run writes into RUN_DIR (``--overwrite`` removes these and nothing else).
RUN_FILES = (CHECKPOINT, "loss.png", "model.json")


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """Check RUN_DIR; returns the checkpoint to resume from, if any."""
    check_writable(run_dir, "run folder")
    ckpt_path = run_dir / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise FmregError(f"--resume: {run_dir} holds no {CHECKPOINT} to continue from")
        return load_checkpoint(ckpt_path)
    if ckpt_path.is_file() and not overwrite:
        raise FmregError(f"{run_dir} holds another run ({CHECKPOINT}): pass --resume to continue it or "
                         "--overwrite to start over")
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    return None


def _load_init(model: torch.nn.Module, config: TrainConfig) -> None:
    """``--init``: the weights of a checkpoint of this model kind (or uniGradICON's, for gradicon)."""
    loaded = load_checkpoint(config.init)
    stored = loaded.get("config")
    kind = stored.get("model", "gradicon") if isinstance(stored, dict) else config.model
    if kind != config.model:
        raise FmregError(f"--init {config.init} is a {kind} checkpoint; --model {config.model} needs a {config.model} one")
    if config.model == "gradicon":
        load_weights(model.regis_net, model_weights(loaded), config.init)
    else:
        load_weights(model, loaded.get("model", loaded), config.init)


def _resumed_config(ckpt: dict, steps: int | None) -> TrainConfig:
    """The checkpoint's configuration; only the number of steps may grow on resume."""
    config = TrainConfig.from_dict(ckpt["config"])
    if steps is not None:
        if steps < ckpt["step"]:
            raise FmregError(f"--steps {steps} is below the {ckpt['step']} steps the run already took")
        config.steps = steps
    return config


def _progress(config: TrainConfig, world: World, start: int, quiet: bool) -> tuple[Callable, Callable]:
    """A tqdm bar with the loss terms (main process, not quiet), and its closer."""
    if quiet or not world.main:
        return (lambda step, terms: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(step: int, terms: dict) -> None:
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)

    return update, bar.close


def machine() -> dict[str, Any]:
    """Where a run happened (for the model card)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}


def model_card(config: TrainConfig, state, world: World, data_note: str, command: str) -> dict[str, Any]:
    """``model.json``: what the model is and exactly how it was trained."""
    last = state.history[-1] if state.history else {}
    return {"model": config.model, "fmreg_version": __version__, "dimension": config.dimension,
            "input_size": list(config.size), "data": data_note, "command": command,
            "optimizer": config.optimizer, "steps": state.step, "wall_time_s": round(state.seconds, 1),
            "processes": world.size, "machine": machine(), "final_loss": last,
            "validation": state.validation, "config": config.to_dict()}


def train(
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    steps: int | None = None,
    log: Log = stderr_log,
    quiet: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Train (or continue training) and write RUN_DIR; returns the model card.

    Args:
        run_dir: The run's folder.
        config: Settings of a new run (ignored on resume: the checkpoint's are used).
        resume: Continue the run in ``run_dir`` exactly where its checkpoint stopped.
        overwrite: Start over in a ``run_dir`` that holds another run.
        steps: On resume, a new (larger) total number of steps.
        log: Progress lines.
        quiet: No progress bar.
        command: The command line to record in ``model.json`` (default: this process's).
    """
    run_dir = absolute(run_dir)
    world = init_world()
    try:
        ckpt = _prepare_run_dir(run_dir, resume, overwrite) if world.main else None
        world.barrier()
        if ckpt is None and resume:
            ckpt = load_checkpoint(run_dir / CHECKPOINT)
        config = _resumed_config(ckpt, steps) if ckpt is not None else config or TrainConfig()
        data, data_note = make_pair_source(config)
        trainer = Trainer(config, data, world)
        if ckpt is not None:
            trainer.restore(ckpt)
            log(f"resuming {run_dir} at step {trainer.state.step} of {config.steps}")
        elif config.init:
            _load_init(trainer.model, config)
            log(f"starting from the weights in {config.init}")
        run_dir.mkdir(parents=True, exist_ok=True)
        update, close = _progress(config, world, trainer.state.step, quiet)
        validate = None
        if config.validation and config.validate_every and world.main:
            from fmreg.evaluate.validation import make_validator

            validate = make_validator(config.validation, config.dimension, tuple(config.size))
        t0 = time.perf_counter()
        try:
            state = trainer.run(run_dir, progress=update, validate=validate)
        finally:
            close()
        card = model_card(config, state, world, data_note, command or shlex.join(sys.argv))
        if world.main:
            _write_results(run_dir, state, card)
            log(f"trained {state.step} steps in {time.perf_counter() - t0:.0f} s: {run_dir}")
        return card
    finally:
        world.finish()


def _write_results(run_dir: Path, state, card: dict) -> None:
    from fmreg.figures.loss_curves import save_loss_curves

    save_loss_curves(run_dir / "loss.png", state.history, title=f"{card['model']}, {card['optimizer']}, {card['data']}")
    with atomic_path(run_dir / "model.json") as tmp:
        tmp.write_text(dump_json(card))
