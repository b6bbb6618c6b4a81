"""Compiling for a GPU or a TPU this host does not have: the compiled program, its memory per
device and the attention kernel it calls, before anyone rents the hardware.

    from jina_jax import aot
    c = aot.compile_forward("v5e-1", rows=8, width=512)          # the released model, bf16
    c.attention, c.kernels, c.total_bytes, c.fits                 # "splash", ("tpu_custom_call",), ...
    t = aot.compile_train_step("h200", rows=32, width=512, remat="full")

Targets are names (`TARGETS`: "h100", "h200", "v5e-1", "v5e-4", "v6e-1", ..., and "cpu": this
host) or a TPU topology such as "v5e:2x4". A GPU target needs the CUDA plugin (`pip install 'jina-jax[cuda12]'` plus the
cuDNN and nvcc wheels, see the README) and `JAX_PLATFORMS=cpu`; a TPU target needs libtpu
(`pip install 'jina-jax[tpu]'`). Nothing runs and nothing is allocated at the released size: the
parameters are shapes (`jax.eval_shape`), placed on the target's abstract devices
(`jax.experimental.topologies`), and the program is lowered and compiled by the target's XLA.

What a compile does not tell: whether a kernel accepts its inputs at run time (cuDNN checks its
graph when it runs), and speed. `memory_analysis()` is XLA's plan for one device: parameters and
inputs (arguments), outputs, temporaries; a single-task forward also keeps whatever the model
holds for the task besides the arguments (`resident_bytes`, e.g. the base weights next to a
merged copy), which is counted in `total_bytes`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import topologies

from .architecture import DEFAULT_LORA_MODULES
from .attention import choose_implementation
from .batcher import Batcher
from .config import JinaConfig, as_dtype
from .embedder import JinaEmbeddingsV3
from .encode import DEFAULT_TOKEN_BUDGET
from .encode import shapes as encode_shapes
from .encoder import JinaEncoder
from .lora import init_adapter
from .tokenize import position_limit
from .training import Contrastive, Trainer

GIB = 1 << 30

# An H200 / H100 as XLA's GPU compiler sees it (a GpuTargetConfigProto in text form), from the
# devices' published figures: 132 SMs of sm_90, 50 MiB L2, HBM size and bandwidth; cuDNN 9.8
# and CUDA 12.8 as the wheels of jax-cuda12-plugin 0.10.2 bring them.
GPU_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 12
  minor: 8
  patch: 0
}}
device_description_str: "{name}"
"""

# HBM per chip of each TPU generation (published figures).
TPU_MEMORY = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# JAX on a GPU preallocates this share of the device's memory for its arrays (its default
# XLA_PYTHON_CLIENT_MEM_FRACTION); a plan that fits must fit in it. A TPU gives JAX all its HBM.
GPU_MEMORY_FRACTION = 0.75
# The compiled programs' attention kernels, as their names appear in the compiled HLO.
# (On a GPU the forward's is __cudnn$fmhaSoftmax, the backward's __cudnn$fmhaSoftmaxBackward.)
KERNELS = {"gpu": r"__cudnn\$fmha\w*", "tpu": r"tpu_custom_call", "cpu": r"(?!)"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A device to compile for: `platform` ("cuda", "tpu" or "cpu"), the backend name the
    attention chooser takes (`backend`: "gpu", "tpu", "cpu"), the topology, and memory per device
    in bytes (`usable`: the share JAX can use)."""

    name: str
    platform: str
    topology: str
    memory: int
    description: str = ""

    @property
    def backend(self) -> str:
        return "gpu" if self.platform == "cuda" else self.platform

    @property
    def usable(self) -> int:
        return int(self.memory * (GPU_MEMORY_FRACTION if self.platform == "cuda" else 1.0))

    @property
    def chips(self) -> int:
        return int(np.prod([int(x) for x in self.topology.split(":")[-1].split("x")]))


TARGETS = {
    # device_memory_size as the driver reports it (H200: 143771 MiB, H100 80GB: 81559 MiB).
    "h200": Target("h200", "cuda", "1x1x1", 150754820096, "NVIDIA H200"),
    "h100": Target("h100", "cuda", "1x1x1", 85520809984, "NVIDIA H100 80GB HBM3"),
    "v5e-1": Target("v5e-1", "tpu", "v5e:1x1", TPU_MEMORY["v5e"]),
    "v5e-4": Target("v5e-4", "tpu", "v5e:2x2", TPU_MEMORY["v5e"]),
    "v5e-8": Target("v5e-8", "tpu", "v5e:2x4", TPU_MEMORY["v5e"]),
    "v6e-1": Target("v6e-1", "tpu", "v6e:1x1", TPU_MEMORY["v6e"]),
    "v6e-4": Target("v6e-4", "tpu", "v6e:2x2", TPU_MEMORY["v6e"]),
    # This host's CPU (its RAM): the same machinery, checked anywhere (the default test suite).
    "cpu": Target("cpu", "cpu", "1", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
}
GPU_BANDWIDTH = {"h200": 4800000000000, "h100": 3350000000000}


def target(spec: str | Target) -> Target:
    """A `Target` from a name in `TARGETS` or a TPU topology "<generation>:<AxB[xC]>"."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"target must be a name or a Target, got {type(spec).__name__}")
    if spec.lower() in TARGETS:
        return TARGETS[spec.lower()]
    generation, _, shape = spec.lower().partition(":")
    if generation in TPU_MEMORY and shape and all(p.isdigit() for p in shape.split("x")):
        return Target(spec.lower(), "tpu", spec.lower(), TPU_MEMORY[generation])
    raise ValueError(
        f"unknown target {spec!r}; expected one of {sorted(TARGETS)} or a TPU "
        f"topology such as 'v5e:2x4' (generations {sorted(TPU_MEMORY)})"
    )


@functools.cache
def devices(spec: str | Target) -> tuple:
    """The target's abstract devices (`jax.experimental.topologies`): compile for them, never
    run. Needs the target's plugin: the CUDA one for a GPU, libtpu for a TPU."""
    t = target(spec)
    if t.platform == "cpu":
        return tuple(jax.devices("cpu"))[:1]
    try:
        if t.platform == "cuda":
            config = GPU_CONFIG.format(
                memory=t.memory, bandwidth=GPU_BANDWIDTH[t.name], name=t.description
            )
            topo = topologies.get_topology_desc(
                platform="cuda", target_config=config, topology=t.topology
            )
        elif t.chips == 1:
            # One chip: the default bounds (2x2x1 chips a host) do not divide 1x1.
            topo = topologies.get_topology_desc(
                t.topology,
                "tpu",
                chip_config_name="default",
                chips_per_host_bounds=(1, 1, 1),
                wrap=(False, False, False),
            )
        else:
            topo = topologies.get_topology_desc(t.topology, "tpu")
    except Exception as e:  # noqa: BLE001 - the plugin's own errors vary; say what is missing
        need = (
            "the CUDA plugin (pip install 'jina-jax[cuda12]', then --no-deps "
            "nvidia-cudnn-cu12 nvidia-cuda-nvcc-cu12; run with JAX_PLATFORMS=cpu)"
            if t.platform == "cuda"
            else "libtpu (pip install 'jina-jax[tpu]'), used by no "
            "other process at the same time (its /tmp/libtpu_lockfile)"
        )
        raise RuntimeError(
            f"cannot describe target {t.name} ({t.topology}): {type(e).__name__}: "
            f"{e}. Compiling for it needs {need}"
        ) from e
    return tuple(topo.devices)


# --- the model as shapes -------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def abstract_weights(config: JinaConfig, param_dtype: str):
    """(params, adapters, scales) as `jax.ShapeDtypeStruct`s: the release's five adapters (rank
    `config.lora_rank` on every Linear and Embedding); nothing allocated."""
    dtype = as_dtype(param_dtype)
    module = JinaEncoder(config, dtype=dtype, param_dtype=dtype)
    params = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    adapter = jax.eval_shape(
        lambda p: init_adapter(p, config.lora_rank, DEFAULT_LORA_MODULES), params
    )
    tasks = tuple(config.lora_adaptations)
    scale = config.lora_alpha / config.lora_rank
    return params, {t: adapter for t in tasks}, {t: scale for t in tasks}


def abstract_model(
    spec,
    *,
    config: JinaConfig | None = None,
    dtype="bfloat16",
    param_dtype=None,
    shard_params: bool = False,
) -> JinaEmbeddingsV3:
    """The model with shapes for weights, sharded over the target's devices (a one-device mesh
    for one device) and compiling for the target's backend."""
    t = target(spec)
    config = config or JinaConfig()
    dtype = as_dtype(dtype)
    param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
    params, adapters, scales = abstract_weights(config, jnp.dtype(param_dtype).name)
    model = JinaEmbeddingsV3(config, params, adapters, scales, dtype=dtype, param_dtype=param_dtype)
    model.forward.backend = t.backend
    model.shard(devices(t), shard_params=shard_params)
    return model


def nbytes(tree) -> int:
    return sum(
        int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
    )


def task_inputs(model: JinaEmbeddingsV3, task, rows: int, merge: bool):
    """The forward's weight inputs for `task` as the model makes them (`task_inputs`), as shapes,
    and the bytes the model keeps for the task besides them (weights it made from the base ones
    and holds next to them: a merged copy). task "mixed": the server's per-row path."""
    made = {}

    def inputs(params, adapters):
        m = JinaEmbeddingsV3(
            model.config,
            params,
            adapters,
            model.scales,
            dtype=model.dtype,
            param_dtype=model.param_dtype,
        )
        spec = model.tasks[0] if task == "mixed" else task
        out = m.task_inputs(spec, rows, merge and task != "mixed")
        base = {id(x) for x in jax.tree_util.tree_leaves(params)}
        made["bytes"] = nbytes(
            [x for x in jax.tree_util.tree_leaves(out["params"]) if id(x) not in base]
        )
        return out

    out = jax.eval_shape(inputs, model.params, model.adapters)
    return out, made["bytes"]


# --- compiling -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One program compiled for a target. Bytes are per device (XLA's `memory_analysis`);
    `total_bytes` = arguments + outputs - aliased + temporaries + `resident_bytes`. A program the
    target's compiler refused as too large has no `executable`, only the temporaries it said
    it needed (`fits` is False)."""

    target: Target
    what: str
    shape: tuple
    attention: str
    kernels: tuple[str, ...]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    resident_bytes: int
    seconds: float
    executable: object = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def total_bytes(self) -> int:
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.resident_bytes
        )

    @property
    def fits(self) -> bool:
        return self.executable is not None and self.total_bytes <= self.target.usable

    def summary(self) -> str:
        rows, width = self.shape[:2]
        if self.executable is None:
            return (
                f"{self.what} {rows}x{width}: OVER, the compiler refused it (temporaries "
                f"{self.temp_bytes / GIB:.2f} GiB for a {self.target.usable / GIB:.1f} GiB "
                f"device), attention {self.attention}, in {self.seconds:.1f} s"
            )
        return (
            f"{self.what} {rows}x{width}: {self.total_bytes / GIB:.2f} GiB of "
            f"{self.target.usable / GIB:.1f} GiB a device ({'fits' if self.fits else 'OVER'}; "
            f"temporaries {self.temp_bytes / GIB:.2f}), attention {self.attention} "
            f"[{', '.join(self.kernels) or 'no fused kernel'}], compiled in "
            f"{self.seconds:.1f} s"
        )


# What a TPU compiler says when a program cannot fit (it refuses to compile it; a GPU compiler
# compiles and plans the excess).
OUT_OF_MEMORY = re.compile(
    r"RESOURCE_EXHAUSTED.*?memory required for HLO temporaries "
    r"\(([\d.]+)([KMGT])\)",
    re.S,
)


def _compiled(t: Target, what, shape, attention, lowered, resident, start) -> Compiled:
    try:
        executable = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        over = OUT_OF_MEMORY.search(str(e))
        if over is None:
            raise
        # Too large for the device: the temporaries the compiler needed, nothing else known.
        temp = int(float(over.group(1)) * (1 << (10 * "KMGT".index(over.group(2)) + 10)))
        return Compiled(
            t,
            what,
            tuple(shape),
            attention,
            (),
            0,
            0,
            0,
            temp,
            int(resident),
            time.perf_counter() - start,
            None,
        )
    memory = executable.memory_analysis()
    text = executable.as_text()
    kernels = tuple(sorted(set(re.findall(KERNELS[t.backend], text))))
    return Compiled(
        t,
        what,
        tuple(shape),
        attention,
        kernels,
        int(memory.argument_size_in_bytes),
        int(memory.output_size_in_bytes),
        int(memory.alias_size_in_bytes),
        int(memory.temp_size_in_bytes),
        int(resident),
        time.perf_counter() - start,
        executable,
    )


def compile_forward(
    spec,
    rows: int,
    width: int,
    *,
    task="retrieval.passage",
    output: str = "pooled",
    dtype="bfloat16",
    param_dtype=None,
    shard_params: bool = False,
    config: JinaConfig | None = None,
) -> Compiled:
    """The embedding forward for `rows` right-padded texts of `width` tokens, compiled for the
    target. task: one task (merged, as `encode` runs a single task), None (no adapter) or
    "mixed" (every adapter stacked, a task per row: the server's path). output: "pooled" (what
    `encode` and the server return) or "hidden" (token states)."""
    start = time.perf_counter()
    t = target(spec)
    model = abstract_model(
        t, config=config, dtype=dtype, param_dtype=param_dtype, shard_params=shard_params
    )
    if rows % model.row_multiple:
        raise ValueError(
            f"rows ({rows}) must be a multiple of the target's {model.row_multiple} devices"
        )
    inputs, resident = task_inputs(model, task, rows, merge=True)
    ids = jax.ShapeDtypeStruct((rows, width), jnp.int32)
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32)
    attention = model.forward.implementation(ids, lengths)
    lowered = model.forward.lower(
        ids=ids, lengths=lengths, output=output, **{k: v for k, v in inputs.items()}
    )
    label = "mixed-task" if task == "mixed" else "no-task" if task is None else "single-task"
    return _compiled(
        t, f"forward {output} {label}", (rows, width), attention, lowered, resident, start
    )


def compile_train_step(
    spec,
    rows: int,
    width: int,
    *,
    query_width: int | None = None,
    remat: str | None = "full",
    dtype="bfloat16",
    shard_params: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    config: JinaConfig | None = None,
) -> Compiled:
    """The LoRA train step (`Trainer.step`: contrastive, both retrieval adapters, AdamW) for
    `rows` query/passage pairs, passages `width` tokens, queries `query_width` (default
    `width`), compiled for the target. Dropout off: attention dropout would take the plain
    attention path (no fused kernel has the hook), see `attention.dot_product_attention`."""
    start = time.perf_counter()
    t = target(spec)
    model = abstract_model(t, config=config, dtype="float32", shard_params=shard_params)
    trainer = Trainer(
        model,
        Contrastive(),
        optimizer or optax.adamw(1e-4),
        remat=remat,
        compute_dtype=dtype,
        dropout=False,
        backend=t.backend,
    )
    state = trainer.layout.place(jax.eval_shape(trainer.init_from, trainer.initial))
    qw = query_width or width
    batch = {
        "query_ids": jax.ShapeDtypeStruct((rows, qw), jnp.int32),
        "query_lengths": jax.ShapeDtypeStruct((rows,), jnp.int32),
        "positive_ids": jax.ShapeDtypeStruct((rows, width), jnp.int32),
        "positive_lengths": jax.ShapeDtypeStruct((rows,), jnp.int32),
    }
    batch = trainer.place_batch(batch)
    attention = choose_implementation(
        trainer.dtype, model.config.head_dim, True, width, backend=t.backend, training=True
    )
    lowered = trainer.lower_step(state, batch)
    return _compiled(t, f"train step remat={remat}", (rows, width), attention, lowered, 0, start)


def largest_batch(
    spec,
    width: int,
    *,
    task="retrieval.passage",
    dtype="bfloat16",
    shard_params: bool = False,
    config: JinaConfig | None = None,
    limit: int = 1 << 16,
    log=None,
) -> tuple[int, Compiled | None]:
    """The most rows of `width` tokens whose pooled forward fits a device of the target, and its
    compile. Memory grows linearly in rows: two compiles give the line, the rows it predicts are
    compiled, then one row more (a multiple of the device count) must not fit; a miss steps."""
    t = target(spec)
    step = t.chips if t.platform == "tpu" else 1
    kwargs: dict[str, Any] = dict(task=task, dtype=dtype, shard_params=shard_params, config=config)
    note = log or (lambda c: None)
    cache: dict[int, Compiled] = {}

    def at(rows):
        if rows not in cache:
            cache[rows] = compile_forward(t, rows, width, **kwargs)
            note(cache[rows])
        return cache[rows]

    lo, hi = step, None  # the most rows known to fit; the fewest known not to
    if not at(lo).fits:
        return 0, None
    probe = 2 * step
    while hi is None or hi - lo > step:
        if at(probe).fits:
            lo = probe
        else:
            hi = probe
        if hi is not None and hi - lo <= step:
            break
        # The next probe where the line through the last two compiles meets the memory limit,
        # kept strictly between what is known (one row more on a miss of the prediction).
        first, last = at(lo), at(hi if hi is not None else lo)
        base = at(step) if first is last else first
        base_rows = step if first is last else lo
        per_row = max(
            1.0, (last.total_bytes - base.total_bytes) / max(1, last.shape[0] - base_rows)
        )
        guess = int(base_rows + (t.usable - base.total_bytes) / per_row) // step * step
        top = limit if hi is None else hi - step
        probe = min(max(guess, lo + step), top)
        if hi is None and probe == lo:  # at the limit
            break
    return lo, at(lo)


# --- the plan ------------------------------------------------------------------------------


def largest_shapes(shape_set: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """From a set of (rows, width): the widest (most rows among those) and the one with most
    rows (widest among those): where attention's and the row-wise memory peak."""
    widest = max(shape_set, key=lambda s: (s[1], s[0]))
    most_rows = max(shape_set, key=lambda s: (s[0], s[1]))
    return [widest] if widest == most_rows else [widest, most_rows]


def encode_set(model: JinaEmbeddingsV3, max_length: int, batch_size: int):
    """Every (rows, width) `encode` can run for texts of at most `max_length` tokens."""
    return encode_shapes(
        position_limit(model.config),
        max_length,
        batch_size,
        DEFAULT_TOKEN_BUDGET,
        model.row_multiple,
    )


def server_set(
    model: JinaEmbeddingsV3, max_length: int, max_batch_size: int = 64, max_batch_tokens: int = 8192
):
    """The (rows, width) shapes the server's warm-up compiles (`Batcher.shapes`)."""
    return Batcher(
        model,
        max_length=max_length,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
    ).shapes()


def plan(
    spec,
    *,
    dtype="bfloat16",
    max_length: int = 8192,
    batch_size: int = 32,
    train_batch_size: int = 32,
    train_length: int = 512,
    shard_params: bool = False,
    fit_widths: Sequence[int] = (512, 8192),
    config: JinaConfig | None = None,
    log=print,
) -> dict:
    """What `jina-jax plan` prints: for the target, whether encode's largest shapes, the server's
    largest warm-up shapes and a LoRA train step (remat "full" and none) fit a device, and the
    largest batch of each of `fit_widths` tokens. Returns the compiles by section."""
    t = target(spec)
    model = abstract_model(t, config=config, dtype=dtype, shard_params=shard_params)
    weights = nbytes(model.params)
    log(
        f"target {t.name}: {len(devices(t))} device(s) ({t.platform}, {t.topology}), "
        f"{t.usable / GIB:.1f} GiB usable a device; weights {weights / GIB:.2f} GiB "
        f"({jnp.dtype(model.param_dtype).name}{', sharded' if shard_params else ''})"
    )
    out: dict = {"target": t, "weights_bytes": weights}
    kwargs: dict[str, Any] = dict(dtype=dtype, shard_params=shard_params, config=config)

    def run(section, shape_list, task):
        for rows, width in shape_list:
            c = compile_forward(t, rows, width, task=task, **kwargs)
            out.setdefault(section, []).append(c)
            log(f"  {c.summary()}")

    shape_set = encode_set(model, max_length, batch_size)
    log(
        f"encode (batch size {batch_size}): {len(shape_set)} shapes up to {max_length} tokens; "
        "the largest, with a task (retrieval.passage) and without"
    )
    run("encode", largest_shapes(shape_set), "retrieval.passage")
    run("encode without a task", largest_shapes(shape_set)[:1], None)
    shape_set = server_set(model, max_length)
    log(
        f"server warm-up set (max batch size 64, 8192 tokens a round): {len(shape_set)} shapes "
        f"up to {max_length} tokens; the largest, every task per row"
    )
    run("server", largest_shapes(shape_set), "mixed")
    log(
        f"LoRA train step ({train_batch_size} query/passage pairs of {train_length} tokens, "
        "both retrieval adapters, AdamW, fp32 master weights)"
    )
    out["train"] = []
    for remat in ("full", None):
        c = compile_train_step(t, train_batch_size, train_length, remat=remat, **kwargs)
        out["train"].append(c)
        log(f"  {c.summary()}")
    out["largest"] = {}
    for width in fit_widths:
        if width > max_length:
            continue
        rows, c = largest_batch(t, width, **kwargs)
        out["largest"][width] = (rows, c)
        log(
            f"largest batch of {width}-token texts (single task, pooled): {rows} rows"
            + (f" ({c.total_bytes / GIB:.2f} GiB)" if c is not None else "")
        )
    return out


__all__ = [
    "Target",
    "TARGETS",
    "Compiled",
    "target",
    "devices",
    "abstract_model",
    "compile_forward",
    "compile_train_step",
    "largest_batch",
    "plan",
]
