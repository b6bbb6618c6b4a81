"""The user's task adapters: folders of LoRA factors read onto a base model, written as small
PEFT folders, and the fixed layout in which a server stacks them (`AdapterSet`).

A path given for an adapter is one of:
- a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`), e.g. one folder of
  `jina-jax finetune --adapter-only` output, or one trained with PEFT on Transformers' model;
- an adapter folder of `jina-jax finetune --adapter-only`: one PEFT folder per trained task,
  each with `jina_jax_task.json` ({"task", "instruction"}: what PEFT has no field for);
- a whole checkpoint in any supported format (`jina-jax finetune`'s default output): its
  adapters that the base's release does not have (or the one named).
`PATH@TASK` picks one task of a folder that holds several.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

from convert.export import peft_folder_name, write_peft_adapter
from convert.formats import CheckpointError, detect_format, read_peft_folder
from convert.formats import load as load_folder

from . import lora as lora_lib
from .architecture import DEFAULT_LORA_MODULES, LORA_MODULES
from .config import RELEASE_TASKS, canonical_task
from .files import writes_folder
from .tree import get_path

TASK_FILE = "jina_jax_task.json"
PEFT_CONFIG = "adapter_config.json"
# Base-model sizes an adapter's checkpoint must share with the model it goes onto.
SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One task adapter: factors in the layout of `lora.py` (np.float32), its scale, the
    instruction `encode` prepends for it, and where it was read from."""

    name: str
    factors: dict
    scale: float
    instruction: str
    source: str

    @property
    def rank(self) -> int:
        return lora_lib.max_rank(self.factors)


def split_spec(spec: str) -> tuple[str, str | None]:
    """ "PATH" or "PATH@TASK" -> (path, task or None)."""
    path, at, task = spec.rpartition("@")
    if at and task and not os.path.exists(spec):
        return path, task
    return spec, None


def _peft_folders(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, e)
        for e in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, e, PEFT_CONFIG))
    )


def _task_file(sub: str) -> dict:
    path = os.path.join(sub, TASK_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("instruction", ""), str):
        raise CheckpointError(f"{path}: key 'instruction' must be a string")
    return data


def _pick(found: Sequence[str], task: str | None, name: str, where: str) -> str:
    """The task to take out of a folder holding `found` tasks."""
    wanted = task or name
    for t in found:
        if canonical_task(t) == canonical_task(wanted):
            return t
    if task is None and len(found) == 1:
        return found[0]
    if task is not None:
        raise CheckpointError(f"{where}: no adapter {task!r} here; it has {list(found)}")
    raise CheckpointError(
        f"{where} holds {len(found)} adapters {list(found)}: pick one with PATH@TASK"
    )


def read_adapter(name: str, spec: str, cfg) -> Adapter:
    """The adapter at `spec` (PATH or PATH@TASK, see the module docstring) for a base model of
    config `cfg`, served as `name`. CheckpointError names the file and key at fault; OSError
    for a path that is not there."""
    if not isinstance(name, str) or not name or any(c in name for c in ":/ "):
        raise ValueError(
            f"adapter name must be a non-empty string without ':', '/' or spaces, got {name!r}"
        )
    path, task = split_spec(spec)
    if not os.path.isdir(path):
        raise FileNotFoundError(2, "no such folder", path)
    if os.path.isfile(os.path.join(path, PEFT_CONFIG)):
        if task is not None:
            raise CheckpointError(f"{path}: a PEFT folder holds one adapter; drop @{task}")
        return _read_peft(name, path, cfg)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _read_checkpoint(name, path, task, cfg)
    subs = _peft_folders(path)
    if not subs:
        raise CheckpointError(
            f"{path}: neither a PEFT folder ({PEFT_CONFIG}), nor a folder of "
            "them, nor a checkpoint (config.json)"
        )
    tasks = {_task_file(s).get("task") or os.path.basename(s): s for s in subs}
    return _read_peft(name, tasks[_pick(list(tasks), task, name, path)], cfg)


def _read_peft(name: str, sub: str, cfg) -> Adapter:
    factors, scale = read_peft_folder(sub, name, cfg)
    return Adapter(name, factors, scale, _task_file(sub).get("instruction", ""), sub)


def _read_checkpoint(name: str, folder: str, task: str | None, cfg) -> Adapter:
    if detect_format(folder) == "transformers":  # its adapters are PEFT folders: read just one
        subs = {os.path.basename(s): s for s in _peft_folders(folder)}
        if not subs:
            raise CheckpointError(f"{folder}: a checkpoint without adapters")
        new = [s for s in subs if canonical_task(s) not in map(canonical_task, RELEASE_TASKS)]
        chosen = _pick(new if task is None and name not in subs else list(subs), task, name, folder)
        adapter = _read_peft(name, subs[chosen], cfg)
        instruction = _checkpoint_instruction(folder, chosen)
        return dataclasses.replace(adapter, instruction=instruction or adapter.instruction)
    ckpt = load_folder(folder)
    ckpt_cfg = ckpt.config
    for size in SIZES:
        if getattr(ckpt_cfg, size) != getattr(cfg, size):
            raise CheckpointError(
                f"{folder}/config.json: key {size!r} is "
                f"{getattr(ckpt_cfg, size)}, the base model's is "
                f"{getattr(cfg, size)}: not an adapter of this model"
            )
    found = list(ckpt.adapters)
    new = [t for t in found if canonical_task(t) not in map(canonical_task, RELEASE_TASKS)]
    chosen = _pick(
        new
        if task is None and not any(canonical_task(t) == canonical_task(name) for t in found)
        else found,
        task,
        name,
        folder,
    )
    return Adapter(
        name,
        ckpt.adapters[chosen],
        float(ckpt.scales[chosen]),
        ckpt_cfg.instruction(chosen),
        f"{folder}@{chosen}",
    )


def _checkpoint_instruction(folder: str, task: str) -> str:
    """The instruction a Transformers-format checkpoint keeps for a task (sentence-transformers'
    prompts), or ""."""
    path = os.path.join(folder, "config_sentence_transformers.json")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        prompts = json.load(f).get("prompts") or {}
    for key, value in prompts.items():
        if canonical_task(key) == canonical_task(task):
            return value
    return ""


def put_adapters(folder: str, cfg, adapters: Mapping, scales: Mapping) -> None:
    """Into the existing `folder`: one PEFT LoRA folder per task of `adapters` ({task:
    factors}), each with its `jina_jax_task.json` (task name, instruction from `cfg`)."""
    for task, factors in adapters.items():
        sub = os.path.join(folder, peft_folder_name(task))
        os.makedirs(sub)
        write_peft_adapter(sub, factors, cfg, scales[task])
        with open(os.path.join(sub, TASK_FILE), "w", encoding="utf-8") as f:
            json.dump({"task": task, "instruction": cfg.instruction(task)}, f, indent=2)


write_adapters = writes_folder(put_adapters)
write_adapters.__doc__ = """An adapter folder (`put_adapters`), written whole or not at all."""


def layout(params, adapters: Mapping, rank: int) -> dict:
    """{module path: (a shape, b shape)} at `rank`: every module the default adapter modules
    or the given adapters adapt, shaped from `params` (what `AdapterSet` stacks)."""
    paths = {LORA_MODULES[m] for m in DEFAULT_LORA_MODULES}
    for adapter in adapters.values():
        paths.update(p for p, _ in lora_lib.adapted_modules(adapter))
    out = {}
    for path in sorted(paths):
        try:
            weight = get_path(params, path + (lora_lib.weight_name(path),))
        except KeyError:
            continue
        lead, (rows, cols) = tuple(weight.shape[:-2]), tuple(weight.shape[-2:])
        out[path] = (lead + (rows, rank), lead + (rank, cols))
    return out


class AdapterSet:
    """The tasks a server runs in its mixed-task forwards, in a fixed layout: the model's own
    adapters, then `slots` places for adapters loaded while it runs, every module padded to
    `rank` (modules an adapter lacks are zero), so the stacked factors keep one shape as
    adapters come and go, and the compiled forwards with them. Immutable: loading or removing
    an adapter makes a new set; a request keeps the set it started with.

    names: one adapter name per stacked task, None for an empty slot. `lora` is the stacked
    tree the forward takes (see `lora.py`), `rows(tasks)` the per-row task_index and mask."""

    def __init__(
        self,
        names: tuple,
        adapters: Mapping,
        scales: Mapping,
        instructions: Mapping,
        shapes: Mapping,
        rank: int,
        fixed: int,
        lora=None,
    ):
        self.names, self.rank, self.shapes = tuple(names), rank, dict(shapes)
        self.fixed = fixed  # the first `fixed` names stay; the rest are slots
        self.adapters, self.scales = dict(adapters), dict(scales)
        self.instructions = dict(instructions)
        self._lora = lora

    @property
    def lora(self):
        """The stacked factors, made on first use (a set built for its layout alone, as
        `aot.server_set` builds one over weight shapes, never stacks)."""
        if self._lora is None:
            self._lora = self._stack()
        return self._lora

    @classmethod
    def build(
        cls, model, users: Sequence[Adapter] = (), slots: int = 0, rank: int | None = None
    ) -> AdapterSet:
        """The model's adapters (those of `users` already on it are not stacked twice), then
        `users`, then `slots` empty slots; the stacked rank is `rank` or the largest of these
        adapters', whichever is larger (a PEFT adapter of rank r on q, k and v has rank 3r
        here: they are one fused projection)."""
        ranks = [lora_lib.max_rank(a) for a in model.adapters.values()] + [u.rank for u in users]
        rank = max(ranks + [rank or 1])
        adapters, scales = dict(model.adapters), dict(model.scales)
        instructions = {t: model.config.instruction(t) for t in model.adapters}
        for user in users:
            adapters[user.name], scales[user.name] = user.factors, user.scale
            instructions[user.name] = user.instruction
        names = tuple(adapters) + (None,) * slots
        out = cls(
            names,
            adapters,
            scales,
            instructions,
            layout(model.params, adapters, rank),
            rank,
            len(adapters),
            lora=None,
        )
        for user in users:
            out.check(user)
        return out

    def _stack(self):
        return lora_lib.stack(
            [self.adapters.get(n, {}) for n in self.names],
            [self.scales.get(n, 0.0) for n in self.names],
            rank=self.rank,
            shapes=self.shapes,
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n is not None)

    @property
    def free_slots(self) -> int:
        return self.names.count(None)

    def resolve_task(self, task: str) -> str:
        """The adapter name for any spelling of a task; ValueError listing the valid ones."""
        for name in self.tasks:
            if canonical_task(name) == canonical_task(task):
                return name
        raise ValueError(
            f"unknown task {task!r}; this server has {list(self.tasks)} (or None for no adapter)"
        )

    def instruction(self, task: str | None) -> str:
        return "" if task is None else self.instructions[task]

    def carry(self, model, task: str | None) -> None:
        """Puts `task`'s adapter of this set onto `model` (its single-task paths, e.g. late
        chunking, use the model's own adapters), unless it is there already."""
        if task is None or model.adapters.get(task) is self.adapters[task]:
            return
        model.attach_adapter(
            Adapter(
                task, self.adapters[task], self.scales[task], self.instructions[task], "adapter set"
            )
        )

    def rows(self, row_tasks: Sequence[str | None]):
        """(task_index int32[B], task_mask float32[B]) for one adapter name (or None) per row."""
        _, task_index, task_mask = lora_lib.task_rows(row_tasks, self.names)
        return task_index, task_mask

    def check(self, adapter: Adapter) -> None:
        """ValueError if `adapter` does not fit this set's layout (rank, modules)."""
        if adapter.rank > self.rank:
            raise ValueError(
                f"{adapter.source}: adapter {adapter.name!r} has rank "
                f"{adapter.rank}, over this server's --max-adapter-rank {self.rank}"
            )
        for path, _ in lora_lib.adapted_modules(adapter.factors):
            if path not in self.shapes:
                raise ValueError(
                    f"{adapter.source}: adapter {adapter.name!r} adapts "
                    f"{'/'.join(path)}, which this server's layout does not stack"
                )

    def with_adapter(self, adapter: Adapter) -> AdapterSet:
        """A new set with `adapter` in a free slot (or in the place of one of the same name
        that was loaded into a slot); ValueError if it does not fit or no slot is free."""
        self.check(adapter)
        names = list(self.names)
        same = [
            i
            for i, n in enumerate(names)
            if n is not None and canonical_task(n) == canonical_task(adapter.name)
        ]
        if same and same[0] < self.fixed:
            raise ValueError(
                f"{adapter.name!r} is an adapter the server started with; choose another name"
            )
        if same:
            names[same[0]] = adapter.name
        elif None in names:
            names[names.index(None)] = adapter.name
        else:
            raise ValueError(
                f"every adapter slot is taken ({len(names) - self.fixed}, "
                "--adapter-slots); remove one first (DELETE /v1/adapters/NAME)"
            )
        return self._replace(names, {adapter.name: adapter})

    def without(self, name: str) -> AdapterSet:
        """A new set with the loaded adapter `name` gone (its slot empty)."""
        task = self.resolve_task(name)
        index = self.names.index(task)
        if index < self.fixed:
            raise ValueError(
                f"{task!r} is an adapter the server started with; only adapters "
                "loaded while it runs can be removed"
            )
        names = list(self.names)
        names[index] = None
        return self._replace(names, {})

    def _replace(self, names, new: Mapping[str, Adapter]) -> AdapterSet:
        adapters = {n: self.adapters[n] for n in names if n is not None and n not in new}
        scales = {n: self.scales[n] for n in adapters}
        instructions = {n: self.instructions[n] for n in adapters}
        for name, adapter in new.items():
            adapters[name], scales[name] = adapter.factors, adapter.scale
            instructions[name] = adapter.instruction
        return AdapterSet(names, adapters, scales, instructions, self.shapes, self.rank, self.fixed)


__all__ = ["Adapter", "AdapterSet", "put_adapters", "read_adapter", "write_adapters", "split_spec"]
