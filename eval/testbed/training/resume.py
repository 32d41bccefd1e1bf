"""Resuming a Hugging Face Trainer run that had already finished.

Its own module so that every trainer here (the testbed's, the recovery recipe's through it,
and the vision stage's plain Trainer) shares it without importing one another."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def finished_checkpoint_output(trainer: Any, checkpoint: str | None) -> Any:
    """Load a checkpoint that is already at the run's ``max_steps`` and return the Trainer's
    ``TrainOutput`` for zero new steps; None for any other checkpoint (train as usual).

    A finished run killed while writing its final weights is resumed from such a checkpoint.
    transformers' loop, resumed there, trains one step more than ``max_steps`` (it checks the
    step count only after a step), so `--resume` would change a finished run."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    if checkpoint is None or trainer.args.max_steps <= 0:
        return None
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        return None
    state = TrainerState.load_from_json(str(state_file))
    if state.global_step < trainer.args.max_steps:
        return None
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = state
    print(
        f"{Path(checkpoint).name} is at max_steps ({trainer.args.max_steps}): loaded, not trained"
    )
    return TrainOutput(state.global_step, 0.0, {"train_runtime": 0.0})
