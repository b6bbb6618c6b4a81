"""Train state through Orbax (`orbax-checkpoint`, the `[orbax]` extra), as Flax recommends.

    from jina_jax import orbax_state
    orbax_state.save(trainer, "runs/step-1000", state)     # params, optimizer state, step, RNG
    state = orbax_state.restore(trainer, "runs/step-1000")  # the identical next step

The same content as `Trainer.save_state` (one safetensors file, kept for exports), in Orbax's
folder format: sharded arrays are written and read in place on a mesh (each host its own
shards), and other Orbax tools read it. The folder appears whole (built beside the target, then
renamed: `files.atomic_folder`), and an existing one is replaced only with overwrite=True.
`restore` checks that the folder holds a jina-jax train state of what this trainer trains.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from .files import atomic_folder
from .training import STATE_FORMAT, Trainer, TrainState

STATE_FOLDER = "state"


def _trains(trainer: Trainer) -> list[list[str]]:
    return [list(p) for p in trainer.paths]


def save(trainer: Trainer, directory: str, state: TrainState, *, overwrite: bool = False) -> str:
    """Writes `state` to the folder `directory` (its parent must exist). Returns its path."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory) and not overwrite:
        raise FileExistsError(f"{directory} already exists (pass overwrite=True to replace it)")
    if not os.path.isdir(os.path.dirname(directory)):
        raise FileNotFoundError(
            f"{os.path.dirname(directory)}: the folder for the train state does not exist"
        )
    checkpointer = ocp.StandardCheckpointer()
    with atomic_folder(directory) as tmp:
        checkpointer.save(
            os.path.join(tmp, STATE_FOLDER),
            state,
            custom_metadata={"format": STATE_FORMAT, "train": json.dumps(_trains(trainer))},
        )
        checkpointer.wait_until_finished()
    return directory


def restore(trainer: Trainer, directory: str) -> TrainState:
    """The state `save` wrote, placed as this trainer places its state (on its mesh, if any).
    A folder of another trainer (other trained leaves, another optimizer) is refused by name."""
    path = os.path.join(os.path.abspath(os.fspath(directory)), STATE_FOLDER)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{directory}: no jina-jax Orbax train state here (no {STATE_FOLDER}/ folder)"
        )
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path).custom_metadata or {}
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{directory}: not a jina-jax train state (format {meta.get('format')!r})")
    saved = json.loads(meta.get("train", "[]"))
    if saved != _trains(trainer):
        raise ValueError(f"{directory}: trains {saved}, but this trainer trains {_trains(trainer)}")
    # The target's shapes, dtypes and shardings: what the trainer's own init would give.
    target = jax.eval_shape(trainer.init)
    try:
        return checkpointer.restore(path, target)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"{directory}: does not match this trainer's state ({e}); was the optimizer changed?"
        ) from None
