"""What a forward batch costs: the price `encode.plan` compares its choices by.

    cost = for_model(model)                  # calibrated for this device and model, if cached,
                                             # else the device's default
    cost.seconds(rows=32, width=48)          # predicted seconds of one [32, 48] batch
    cost = calibrate(model)                  # times a few shapes, fits, caches: once per device

The model, for a batch of T = rows x width padded tokens:

    seconds = call_s + max(T, min_tokens) * token_s + T * width * key_s

call_s is what every call costs whatever its size (dispatch, reading every weight once);
token_s the dense layers' time per token (projections, FFN: the same for every token); key_s
attention's, per token per key (a row of width w has w keys); min_tokens the size below which a
batch runs no faster (its matmuls are too small for the CPU's vector units, or leave most of a
GPU's cores idle). On this repository's 2-core CPU at the released widths and 6 layers a call
costs what about 20 tokens cost and batches under about 100 tokens run no faster (twelve shapes
from 1x32 to 2x1024 timed best of 3 on a loaded machine, as `calibrate` does); on a GPU the call is cheap against a small batch's
tokens but a batch under thousands of tokens leaves the chip mostly idle, so there the plan
merges rungs into fewer, fuller batches. The defaults scale with the model's FLOPs (layers,
hidden size, FFN size); `calibrate` replaces them with a fit to timed shapes on the device at
hand, kept in the compilation cache folder (`<cache>/jina-jax-costs/`), keyed on the device,
the config, the dtypes and the matmul precision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings

import jax
import numpy as np

from .files import atomic_file

FORMAT = 1  # bump when the cached file's meaning changes
FOLDER = "jina-jax-costs"


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one forward batch (see the module docstring)."""

    call_s: float
    token_s: float
    key_s: float
    min_tokens: int
    shape_s: float = 0.0  # a plan's price for one more distinct shape (a compile, amortised)
    source: str = "default"  # "default:<platform>" or "calibrated:<device>"

    def seconds(self, rows: int, width: int) -> float:
        tokens = rows * width
        return (
            self.call_s + max(tokens, self.min_tokens) * self.token_s + tokens * width * self.key_s
        )


# Per platform: dense FLOP/s, attention FLOP/s, per-call seconds per layer, min_tokens and
# shape_s (seconds: a compile; the layers are scanned, so it does not grow with depth).
# CPU: fitted on this repository's 2-core machine (shared; the ratios are what the plan uses),
# shape_s the value at which the benchmark's large corpus keeps the padding plan's shape count
# (26 against 27) at less padding (7.8% against 8.7%). GPU/TPU: not measured (no device was lent
# when these were set): a call of a few tens of microseconds a layer, a chip that needs about
# 16k (GPU) / 8k (TPU) tokens a batch to be busy, compiles of a few seconds.
DEVICE_DEFAULTS = {
    "cpu": (70e9, 17e9, 7e-3, 96, 1.2),
    "gpu": (150e12, 60e12, 50e-6, 16384, 3.0),
    "tpu": (150e12, 75e12, 40e-6, 8192, 3.0),
}


def dense_flops(cfg) -> float:
    """Matmul FLOPs per token of the dense layers: Q, K, V, output projection and the FFN."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * 2 * (4 * h * h + 2 * h * f)


def key_flops(cfg) -> float:
    """Attention FLOPs per token per key: QK^T and PV."""
    return cfg.num_hidden_layers * 4 * cfg.hidden_size


def default(cfg, platform: str | None = None) -> CostModel:
    """The device default for this config (`platform`: "cpu", "gpu", "tpu"; default: JAX's
    default backend; anything else counts as "gpu")."""
    platform = platform or jax.default_backend()
    platform = platform if platform in DEVICE_DEFAULTS else "gpu"
    dense_rate, key_rate, call_per_layer, min_tokens, shape_s = DEVICE_DEFAULTS[platform]
    return CostModel(
        call_per_layer * cfg.num_hidden_layers,
        dense_flops(cfg) / dense_rate,
        key_flops(cfg) / key_rate,
        min_tokens,
        shape_s,
        f"default:{platform}",
    )


def fit(samples) -> tuple[float, float, float, int]:
    """(call_s, token_s, key_s, min_tokens) from timed (rows, width, seconds): a least-squares
    fit of the linear part on batches of at least 256 tokens, then the smallest size below
    which the small batches took no less time."""
    samples = [(r, w, s) for r, w, s in samples]
    big = [(r, w, s) for r, w, s in samples if r * w >= 256]
    if len(big) < 3:
        raise ValueError("calibration needs at least three timed shapes of 256+ tokens")
    a = np.array([[1.0, r * w, r * w * w] for r, w, _ in big])
    y = np.array([s for *_, s in big])
    # Relative error is what the plan compares: weight each sample by 1 / its time.
    coef, *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)
    # Noise (a shared machine) or a model too small to cost anything per token can fit a
    # negative coefficient: none is below zero, and a token costs something.
    call_s, token_s, key_s = (max(float(c), 0.0) for c in coef)
    token_s = max(token_s, 1e-12)
    # A small batch that took longer than its tokens predict ran at a floor: the tokens its
    # time is worth. The largest such floor is the model's.
    floors = [(s - call_s - r * w * w * key_s) / token_s for r, w, s in samples if r * w < 256]
    floors = [
        f
        for f, (r, w, _) in zip(floors, [x for x in samples if x[0] * x[1] < 256])
        if f > 1.05 * r * w
    ]
    return call_s, token_s, key_s, max(1, round(max(floors, default=1)))


# Timed by `calibrate`: small batches (the floor), then 256 to 2048 tokens at widths from 32 to
# 1024 (the per-call cost, the slope and attention's share apart): about 7,600 tokens a round
# plus a compile per shape.
CALIBRATION_SHAPES = (
    (1, 32),
    (4, 32),
    (2, 128),
    (16, 32),
    (32, 32),
    (8, 128),
    (1, 512),
    (4, 256),
    (1, 1024),
    (2, 1024),
)


def cache_path(model) -> str | None:
    """Where this device's and model's calibration is kept (None: the cache is off)."""
    folder = getattr(model.forward, "cache_dir", None)
    if not folder:
        return None
    device = jax.devices()[0]
    key = json.dumps(
        {
            "format": FORMAT,
            "platform": device.platform,
            "device": getattr(device, "device_kind", ""),
            "count": jax.device_count(),
            "config": dataclasses.asdict(model.config),
            "dtype": str(model.dtype),
            "param_dtype": str(model.param_dtype),
            "precision": model.forward.precision,
        },
        sort_keys=True,
        default=str,
    )
    return os.path.join(folder, FOLDER, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def for_model(model) -> CostModel:
    """The calibrated cost for this device and model if `calibrate` cached one, else the
    device default for its config."""
    path = cache_path(model)
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                record = json.load(f)
            return CostModel(**record["cost"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(
                f"{path}: unreadable cost calibration ({e}); using the default", stacklevel=2
            )
    return default(model.config)


def calibrate(
    model, task=None, shapes=CALIBRATION_SHAPES, repeats: int = 3, save: bool = True
) -> CostModel:
    """Times `model.pooled` on `shapes` (after one untimed call each, which compiles; best of
    `repeats` calls, the shapes interleaved so a slow moment of a shared machine hits all of
    them), fits the cost model and, with `save`, caches it for `for_model`. The fitted model
    is what `encode` plans with on this device and model from then on."""
    rng = np.random.default_rng(0)
    inputs = {}
    limit = model.config.max_position_embeddings - 2
    for rows, width in [(r, w) for r, w in shapes if w <= limit]:
        ids = rng.integers(3, min(model.config.vocab_size, 1000), (rows, width)).astype(np.int32)
        inputs[(rows, width)] = ids, np.full((rows,), width, np.int32)
        np.asarray(model.pooled(*inputs[(rows, width)], task))
    best = dict.fromkeys(inputs, float("inf"))
    for _ in range(repeats):
        for shape, (ids, lengths) in inputs.items():
            start = time.perf_counter()
            np.asarray(model.pooled(ids, lengths, task))
            best[shape] = min(best[shape], time.perf_counter() - start)
    device = jax.devices()[0]
    call_s, token_s, key_s, min_tokens = fit([(r, w, s) for (r, w), s in best.items()])
    # A compile is not timed here (the executable store or JAX's cache may have served it):
    # a new shape keeps the device default's price.
    cost = CostModel(
        call_s,
        token_s,
        key_s,
        min_tokens,
        default(model.config, device.platform).shape_s,
        source=f"calibrated:{getattr(device, 'device_kind', device.platform)}",
    )
    path = cache_path(model) if save else None
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, "w") as f:
            json.dump(
                {
                    "cost": dataclasses.asdict(cost),
                    "timed": {f"{r}x{w}": s for (r, w), s in best.items()},
                },
                f,
            )
    return cost
