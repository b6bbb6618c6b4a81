"""Compiled executables kept on disk, so that a new process runs a shape it ran before without
tracing it again.

JAX's persistent compilation cache skips XLA's compile, but each new process still traces and
lowers every shape to compute that cache's key: 0.7 s a shape on the 6-layer benchmark, 14 s for
the 20 shapes of 256 mixed texts. This store keeps the serialized executable itself
(`jax.experimental.serialize_executable`), under a key made of everything that determines it:
this package's source, the JAX version, the backend and device, the function (its name and
settings) and the abstract arguments (tree structure, shapes, dtypes).

    store = ExecutableStore(folder)
    key = store.key({"function": "forward", "config": ...}, abstract_signature(args))
    compiled = store.load(key)
    if compiled is None:
        compiled, fresh = store.compile(jax.jit(f), args)
        if fresh:
            store.save(key, compiled)
    out = compiled(*args)

Entries are written atomically (temporary sibling, then rename); an entry that cannot be read
back (truncated, from another build) is ignored and compiled again. Loading runs pickled code
from the folder: it has the same trust as JAX's own cache folder, the user's.

Only executables compiled in this process are saved: on CPU (jaxlib 0.10.2) an executable that
JAX loaded from its own persistent cache serializes without its kernels, and the copy fails when
run ("Function ... not found"). So `compile` keeps JAX's cache from writing what the store
keeps, and an executable that came from JAX's cache anyway (an entry written before) is used
but not saved.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
import threading
import warnings

import jax
from jax._src import config as jax_state  # thread-local settings (jax 0.10.2 has no public one)
from jax.experimental import serialize_executable

# Bump when the entry layout or the key's meaning changes.
FORMAT = 1
SUFFIX = ".jexe"
HIT_EVENT = "/jax/compilation_cache/cache_hits"

_hits = threading.local()  # JAX cache hits seen by this thread


def _count_hit(event: str, **kwargs) -> None:
    if event == HIT_EVENT:
        _hits.count = getattr(_hits, "count", 0) + 1


@functools.cache
def _listen() -> None:
    """Registers `_count_hit` once per process."""
    jax.monitoring.register_event_listener(_count_hit)


@functools.cache
def source_fingerprint() -> str:
    """sha256 of every Python file of this package: a changed model means new keys."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def abstract_signature(args) -> tuple | None:
    """(tree structure, ((shape, dtype, weak_type), ...)) of `args`; None when a leaf is not an
    array on the default device (a Python scalar, an array placed elsewhere), which the store
    leaves to `jax.jit`. Runs on every forward call: dtypes stay objects here (their names,
    6 us each, are only needed for a key)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    default = {jax.devices()[0]}
    avals = []
    for leaf in leaves:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            return None
        if isinstance(leaf, jax.Array) and leaf.devices() != default:
            return None
        avals.append((tuple(leaf.shape), leaf.dtype, getattr(leaf, "weak_type", False)))
    return tree, tuple(avals)


class ExecutableStore:
    """A folder of serialized executables, one file per key."""

    def __init__(self, folder: str):
        self.folder = folder
        self.warned = False

    def key(self, function: dict, signature: tuple) -> str:
        """Hex key of a function (a JSON-able description of what was traced: name, config,
        dtypes, settings) at one abstract signature."""
        tree, avals = signature
        device = jax.devices()[0]
        # (ignores: jax.config's flags and jax.lib's version are set at run time, unknown to
        # their stubs)
        text = json.dumps(
            {
                "format": FORMAT,
                "source": source_fingerprint(),
                "jax": jax.__version__,
                "jaxlib": jax.lib.__version__,  # pyright: ignore[reportPrivateImportUsage]
                "platform": device.platform,
                "platform_version": device.client.platform_version,
                "device_kind": device.device_kind,
                "devices": jax.device_count(),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "x64": bool(jax.config.jax_enable_x64),  # pyright: ignore[reportAttributeAccessIssue]
                "matmul_precision": str(jax.config.jax_default_matmul_precision),  # pyright: ignore[reportAttributeAccessIssue]
                "function": function,
                "tree": str(tree),
                "avals": avals,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def compile(self, function, args) -> tuple:
        """(compiled, fresh): `function` (jitted) traced, lowered and compiled for `args`, with
        JAX's persistent cache told not to write it; fresh is False when JAX loaded it from an
        entry it already had (such an executable must not be saved, see above). Threads may
        compile at once (XLA's compile releases the GIL): the setting is this thread's."""
        _listen()
        before = getattr(_hits, "count", 0)
        with jax_state.persistent_cache_min_compile_time_secs(1e12):
            compiled = function.lower(*args).compile()
        return compiled, getattr(_hits, "count", 0) == before

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + SUFFIX)

    def load(self, key: str):
        """The loaded `jax.stages.Compiled` for `key`, or None (absent or unreadable)."""
        try:
            with open(self.path(key), "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
            compiled = serialize_executable.deserialize_and_load(
                blob, in_tree, out_tree, execution_devices=[jax.devices()[0]]
            )
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a bad entry is a miss: it is compiled and rewritten
            return None
        return compiled

    def save(self, key: str, compiled) -> bool:
        """Writes `compiled` under `key` (temporary sibling, then rename). A failure to write
        (no space, read-only folder, an executable that cannot be serialized) warns once and
        leaves the run going."""
        try:
            blob, in_tree, out_tree = serialize_executable.serialize(compiled)
            os.makedirs(self.folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + key[:16], suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    pickle.dump((blob, in_tree, out_tree), f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except Exception as e:  # noqa: BLE001 - the store is an optimisation, never a failure
            if not self.warned:
                self.warned = True
                warnings.warn(
                    f"compiled executables are not kept in {self.folder} "
                    f"({type(e).__name__}: {e}); each process traces them again",
                    stacklevel=2,
                )
            return False
        return True
