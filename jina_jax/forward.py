"""The compiled forward of a model object: one jitted function per (attention implementation,
output), each compiled once per input shape (and, for the embedding outputs, kept on disk by the
executable store so that a new process loads it untraced), placed on a device mesh when there
is one.

    forward = CompiledForward(config, dtype, param_dtype)
    out = forward(params, ids, lengths=lengths, lora=lora)          # EncoderOutput
    pooled = forward(params, ids, lengths=lengths, output="pooled")  # mean-pooled fp32 [B, H]

The attention implementation is chosen per call (`attention.choose_implementation`); if the
cuDNN kernel fails to lower, this forward says so once and uses XLA from then on. A head model
passes `outputs`, a pure function that turns the encoder output into its head's output inside
the same compiled function.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import warnings
from collections.abc import Callable
from typing import cast

import jax

from .attention import choose_implementation
from .encoder import EncoderOutput, JinaEncoder, mean_pool
from .executables import ExecutableStore, abstract_signature
from .sharding import Layout, mesh_layout, on_mesh

# "0" / "off" / "false" turns the persistent compilation cache off; any other value is its folder.
CACHE_ENV = "JINA_JAX_COMPILATION_CACHE"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jina-jax", "xla")


def enable_compilation_cache(folder: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache so that a second process compiles nothing
    it compiled before (same model shapes, same machine). The folder: `folder`, else
    $JINA_JAX_COMPILATION_CACHE, else ~/.cache/jina-jax/xla; "0"/"off" in the variable turns it
    off. A cache folder the user already gave JAX is left as it is. Returns the folder in use
    (None: off); `CompiledForward` keeps its executable store (`executables.py`: no tracing
    in a second process) in the folder's `jina-jax-executables` subfolder."""
    setting = os.environ.get(CACHE_ENV, "")
    if folder is None and setting.lower() in ("0", "off", "false", "no"):
        return None
    # jax.config's flags are attributes made at run time, unknown to its type stub.
    if jax.config.jax_compilation_cache_dir:  # pyright: ignore[reportAttributeAccessIssue]
        return jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    folder = folder or setting or default_cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        warnings.warn(
            f"compilation cache off: cannot create {folder} ({e.strerror or e})", stacklevel=2
        )
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every compiled forward, however quick: the point is a second process compiling none.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def encoder_output(encoded: EncoderOutput, params, head_params, lora, task_index, task_mask):
    """The default `outputs`: the encoder's own output."""
    return encoded


PRECISIONS = (None, "default", "high", "highest")
OUTPUTS = ("outputs", "pooled", "hidden")
# Outputs whose traced function is all ours (a head model's "outputs" runs its own code), so the
# executable store's key describes them completely.
STORED_OUTPUTS = ("pooled", "hidden")


class CompiledForward:
    """`precision`: the matmul precision the forward is compiled with (`jax.default_matmul_
    precision`); None leaves JAX's default, which on GPU runs fp32 matmuls in TF32."""

    def __init__(
        self,
        config,
        dtype,
        param_dtype,
        outputs: Callable = encoder_output,
        precision: str | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.config, self.dtype, self.param_dtype, self.outputs = (
            config,
            dtype,
            param_dtype,
            outputs,
        )
        self.precision = precision
        self.functions: dict = {}
        self.cudnn_failed = False
        # Executables made ready in this process (traced and compiled, or loaded from the
        # store): one per new shape or input structure.
        self.compile_count = 0
        self.loaded_count = 0  # of which loaded from the executable store
        self.layout: Layout | None = None
        # The platform the forward is compiled for (`choose_implementation`'s backend); None:
        # this host's. `jina_jax.aot` sets it to a target's ("gpu", "tpu") to compile without it.
        self.backend: str | None = None
        self.cache_dir = enable_compilation_cache()
        self.store = (
            ExecutableStore(os.path.join(self.cache_dir, "jina-jax-executables"))
            if self.cache_dir
            else None
        )
        self.executables: dict = {}
        # Threads may ready shapes at once (a warm-up pool beside a serving worker): one lock
        # for the counters and tables, and a shape being readied is readied once, by whoever
        # asked first, while later askers wait for it (`pending`).
        self.lock = threading.RLock()
        self.pending: dict = {}

    def module(self, implementation: str = "xla", deterministic: bool = True) -> JinaEncoder:
        return JinaEncoder(
            self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            implementation=implementation,
            deterministic=deterministic,
        )

    def implementation(self, ids, lengths=None) -> str:
        """The attention implementation for a batch: cuDNN needs right-padded `lengths`."""
        impl = choose_implementation(
            self.dtype,
            self.config.head_dim,
            lengths is not None,
            ids.shape[1],
            backend=self.backend,
        )
        return "xla" if impl == "cudnn" and self.cudnn_failed else impl

    def function(self, implementation: str, output: str = "outputs"):
        """The jitted `(params, head_params, ids, mask, lengths, lora, task_index, task_mask)`
        for one implementation. output: "outputs" (the encoder's, or a head model's head's),
        "pooled" (mean-pooled fp32 [B, H]: what `encode` needs, no [B, L, H] goes to the host)
        or "hidden" (last_hidden_state [B, L, H], whatever the model's head)."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        key = (implementation, output)
        with self.lock:
            if key not in self.functions:
                self.functions[key] = self._jitted(implementation, output)
            return self.functions[key]

    def _jitted(self, implementation: str, output: str):
        """`function`'s jitted forward, made once per (implementation, output)."""
        module = self.module(implementation)

        def forward(params, head_params, ids, mask, lengths, lora, task_index, task_mask):
            with self.lock:
                self.compile_count += 1  # runs once per trace, i.e. per compiled shape
            with contextlib.ExitStack() as scope:
                if self.precision is not None:
                    scope.enter_context(jax.default_matmul_precision(self.precision))
                if self.mesh is not None:  # a Pallas kernel runs per device under it
                    scope.enter_context(jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh))
                out = cast(  # apply without `mutable` returns __call__'s output, not a tuple
                    EncoderOutput,
                    module.apply(
                        {"params": params},
                        ids,
                        attention_mask=mask,
                        lengths=lengths,
                        lora=lora,
                        task_index=task_index,
                        task_mask=task_mask,
                    ),
                )
            if output == "pooled":
                return mean_pool(out.last_hidden_state, lengths)
            if output == "hidden":
                return out.last_hidden_state
            return self.outputs(out, params, head_params, lora, task_index, task_mask)

        return jax.jit(forward)

    def runner(self, implementation: str, output: str, args: tuple):
        """What runs `args`: the executable for their shapes, from this process or the store
        (traced and compiled once, then saved), or the jitted function where the store does not
        apply (off, a device mesh, a head model's outputs, arrays on another device)."""
        function = self.function(implementation, output)
        if self.store is None or self.layout is not None or output not in STORED_OUTPUTS:
            return function
        signature = abstract_signature(args)
        if signature is None:
            return function
        local = (implementation, output, signature)
        with self.lock:
            compiled = self.executables.get(local)
            if compiled is not None:
                return compiled
            mine = self.pending.get(local)
            waiting = mine is not None
            if mine is None:
                mine = self.pending[local] = concurrent.futures.Future()
        if waiting:  # another thread is readying this shape: its result
            return mine.result()
        try:
            compiled = self._ready(self.store, function, implementation, output, signature, args)
        except BaseException as e:
            with self.lock:
                del self.pending[local]
            mine.set_exception(e)
            raise
        with self.lock:
            self.executables[local] = compiled
            del self.pending[local]
        mine.set_result(compiled)
        return compiled

    def _ready(self, store, function, implementation: str, output: str, signature, args):
        """The executable for `args`: loaded from `store`, else traced, compiled and saved."""
        key = store.key(self.description(implementation, output), signature)
        compiled = store.load(key)
        if compiled is None:
            compiled, fresh = store.compile(function, args)  # the trace counts it
            if fresh:
                store.save(key, compiled)
        else:
            with self.lock:
                self.compile_count += 1
                self.loaded_count += 1
        return compiled

    def description(self, implementation: str, output: str) -> dict:
        """What determines the traced function besides the arguments' shapes."""
        return {
            "function": "CompiledForward",
            "implementation": implementation,
            "output": output,
            "precision": self.precision,
            "dtype": str(self.dtype),
            "param_dtype": str(self.param_dtype),
            "config": dataclasses.asdict(self.config),
        }

    @property
    def implementations(self) -> list[str]:
        """The implementations compiled so far, in order."""
        return [impl for impl, _ in self.functions]

    def shard(self, devices=None, shard_params: bool = False, **mesh_options):
        """Runs on a mesh from now on (`sharding.mesh_layout` takes the arguments)."""
        self.layout = mesh_layout(devices, shard_params=shard_params, **mesh_options)

    @property
    def mesh(self):
        return None if self.layout is None else self.layout.mesh

    @property
    def shard_params(self) -> bool:
        return self.layout is not None and self.layout.shard_params

    def place(self, params):
        """Parameters onto the mesh (as they are without one)."""
        return params if self.layout is None else self.layout.place(params)

    # The encoder's inputs (as `JinaEncoder.__call__` takes them) and the head's, packed: the
    # formatter would write one a line.
    def arguments(
        self, params, ids, *, mask=None, lengths=None, lora=None, task_index=None, task_mask=None,
        head_params=None,
    ) -> tuple:  # fmt: skip
        """The compiled function's positional arguments, placed on the mesh if any."""
        if self.layout is not None:
            params = self.place(params)
            head_params, lora = self.layout.replicate((head_params, lora))
            ids, mask, lengths, task_index, task_mask = (
                self.layout.rows(x) for x in (ids, mask, lengths, task_index, task_mask)
            )
        return params, head_params, ids, mask, lengths, lora, task_index, task_mask

    def lower(self, params, ids, *, output: str = "outputs", **inputs):
        """The lowered computation for these inputs (`.compile()`, `.as_text()`), e.g. to check
        which attention kernel a shape gets."""
        impl = self.implementation(ids, inputs.get("lengths"))
        with on_mesh(self.layout):
            return self.function(impl, output).lower(*self.arguments(params, ids, **inputs))

    def __call__(self, params, ids, *, output: str = "outputs", **inputs):
        """ids: int32 [B, L]; inputs: mask or lengths, lora, task_index, task_mask, head_params
        (see `arguments`)."""
        with on_mesh(self.layout):
            return self._with_fallback(
                ids,
                inputs,
                lambda impl, args: self.runner(impl, output, args)(*args),
                self.arguments(params, ids, **inputs),
            )

    def prepare(self, params, ids, *, output: str = "outputs", **inputs) -> bool:
        """Makes the executable for these inputs ready (compiled, or loaded from the store)
        without running it. False where the store does not apply (see `runner`): there only a
        call compiles."""

        def ready(impl, args):
            return self.runner(impl, output, args) is not self.function(impl, output)

        with on_mesh(self.layout):
            return self._with_fallback(ids, inputs, ready, self.arguments(params, ids, **inputs))

    def _with_fallback(self, ids, inputs, step, args):
        """step(implementation, args); a cuDNN failure (lowering or running) switches this
        forward to XLA for good and retries."""
        impl = self.implementation(ids, inputs.get("lengths"))
        if impl == "cudnn":
            try:
                return step(impl, args)
            except Exception as e:  # noqa: BLE001 - any lowering failure falls back to XLA
                self.cudnn_failed = True
                impl = "xla"
                warnings.warn(
                    f"cuDNN attention failed ({type(e).__name__}: {e}); "
                    "using the XLA implementation from now on",
                    stacklevel=2,
                )
        return step(impl, args)
