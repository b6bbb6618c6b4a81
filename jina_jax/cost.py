"""What a forward batch costs: the price `encode.plan` compares its choices by.

    cost = for_model(model)                  # calibrated for this device and model, if cached,
                                             # else the device's default
    cost.seconds(rows=32, width=48)          # predicted seconds of one [32, 48] batch
    cost = calibrate(model)                  # times a few shapes, fits, caches: once per device

The model, for a batch of T = rows x width padded tokens:

    seconds = call_s + max(T, min_tokens) * token_s + T * width * key_s
              + max(0, T - knee_tokens) * knee_s          (knee_tokens 0: no knee)

call_s is what every call costs whatever its size (dispatch, reading every weight once);
token_s the dense layers' time per token (projections, FFN: the same for every token); key_s
attention's, per token per key (a row of width w has w keys); min_tokens the size below which a
batch runs no faster (its matmuls are too small for the CPU's vector units, or leave most of a
GPU's cores idle); knee_tokens the size past which a batch runs slower per token (on a CPU its
activations outgrow the caches), knee_s what each token past it costs more. On this
repository's 2-core CPU at the released widths and 6 layers a call costs what about 40 tokens
cost, batches under about 150 tokens run no faster and past 2048 tokens each token costs 27%
more (thirteen shapes from 1x32 to 4x1024, best of 3, quiet, as `calibrate` times them); on a
GPU the call is cheap against a small batch's tokens but a batch under thousands of tokens
leaves the chip mostly idle, so there the plan merges rungs into fewer, fuller batches.
shape_s is what a new shape costs once (a compile), which the plan weighs against what it saves
(`encode.PAYBACK_S`). The defaults scale with the model's FLOPs (layers, hidden size, FFN
size); `calibrate` replaces them with a fit to timed shapes on the device at hand, kept in the
compilation cache folder (`<cache>/jina-jax-costs/`), keyed on the device, the config, the
dtypes and the matmul precision.
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

FORMAT = 2  # bump when the cached file's meaning changes
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
    knee_tokens: int = 0  # past this many tokens a batch runs slower per token (0: never)
    knee_s: float = 0.0  # what each token past knee_tokens costs on top of token_s

    def seconds(self, rows: int, width: int) -> float:
        tokens = rows * width
        past_knee = max(0, tokens - self.knee_tokens) if self.knee_tokens else 0
        return (
            self.call_s
            + max(tokens, self.min_tokens) * self.token_s
            + tokens * width * self.key_s
            + past_knee * self.knee_s
        )


# Per platform: dense FLOP/s, attention FLOP/s, per-call seconds per layer, min_tokens,
# shape_s (seconds: a compile; the layers are scanned, so it does not grow with depth), and
# the knee: the batch size in tokens past which each token costs a fraction more.
# CPU: `calibrate` on this repository's 2-core machine, quiet, 6 layers at the released widths,
# fp32 (13 shapes, best of 3: 32x32 578 ms, 8x256 1219 ms, 16x256 2718 ms, 4x1024 3305 ms
# predicted, each within 4% of its time): past 2048 tokens a token costs 27% more (16x256 ran
# 1.15x slower per token than 8x256, 4x1024 1.08x than 2x1024); a compile took 0.44-0.82 s
# (five shapes, 32x40 to 2x1536, compilation cache off). GPU/TPU: not measured (no device was
# lent when these were set): a call of a few tens of microseconds a layer, a chip that needs
# about 16k (GPU) / 8k (TPU) tokens a batch to be busy, compiles of a few seconds, no knee.
DEVICE_DEFAULTS = {
    "cpu": (281e9, 131e9, 3.8e-3, 147, 0.6, 2048, 0.275),
    "gpu": (150e12, 60e12, 50e-6, 16384, 3.0, 0, 0.0),
    "tpu": (150e12, 75e12, 40e-6, 8192, 3.0, 0, 0.0),
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
    dense_rate, key_rate, call_per_layer, min_tokens, shape_s, knee, past_knee = DEVICE_DEFAULTS[
        platform
    ]
    token_s = dense_flops(cfg) / dense_rate
    return CostModel(
        call_per_layer * cfg.num_hidden_layers,
        token_s,
        key_flops(cfg) / key_rate,
        min_tokens,
        shape_s,
        f"default:{platform}",
        knee_tokens=knee,
        knee_s=past_knee * token_s,
    )


def fit(samples) -> dict:
    """CostModel's fields (call_s, token_s, key_s, min_tokens, knee_tokens, knee_s) from timed
    (rows, width, seconds): a least-squares fit of the linear part on batches of at least 256
    tokens, once without a knee and once for each timed size as the knee, keeping the best fit
    (a knee must explain the batches past it: more than one of them, a fit at least 10%
    closer, a token past it dearer by 1% or more); then the smallest size below which the
    small batches took no less time."""
    samples = [(r, w, s) for r, w, s in samples]
    big = [(r, w, s) for r, w, s in samples if r * w >= 256]
    if len(big) < 3:
        raise ValueError("calibration needs at least three timed shapes of 256+ tokens")
    y = np.array([s for *_, s in big])

    def solve(knee: int):
        columns = [
            [1.0, r * w, r * w * w] + ([max(0, r * w - knee)] if knee else []) for r, w, _ in big
        ]
        a = np.array(columns) / y[:, None]  # relative error is what the plan compares
        coef, *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
        # Noise (a shared machine) or a model too small to cost anything per token can fit a
        # negative coefficient: none is below zero, and a token costs something.
        coef = [max(float(c), 0.0) for c in coef]
        coef[1] = max(coef[1], 1e-12)
        residual = float(np.sum((a @ np.array(coef) - 1.0) ** 2))
        return residual, coef

    residual, coef = solve(0)
    knee = 0
    for size in sorted({r * w for r, w, _ in big}):
        if sum(r * w > size for r, w, _ in big) < 2:
            continue
        r_knee, c_knee = solve(size)
        if r_knee < 0.9 * residual and c_knee[3] > 0.01 * c_knee[1]:
            residual, coef, knee = r_knee, c_knee, size
    call_s, token_s, key_s = coef[:3]
    knee_s = coef[3] if knee else 0.0
    # A small batch that took longer than its tokens predict ran at a floor: the tokens its
    # time is worth. The largest such floor is the model's.
    small = [(r, w, s) for r, w, s in samples if r * w < 256]
    floors = [(s - call_s - r * w * w * key_s) / token_s for r, w, s in small]
    floors = [f for f, (r, w, _) in zip(floors, small) if f > 1.05 * r * w]
    return {
        "call_s": call_s,
        "token_s": token_s,
        "key_s": key_s,
        "min_tokens": max(1, round(max(floors, default=1))),
        "knee_tokens": knee,
        "knee_s": knee_s,
    }


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
    (8, 256),
    (1, 1024),
    (2, 1024),
    (16, 256),
    (4, 1024),
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
    fitted = fit([(r, w, s) for (r, w), s in best.items()])
    # A compile is not timed here (the executable store or JAX's cache may have served it):
    # a new shape keeps the device default's price.
    cost = CostModel(
        **fitted,
        shape_s=default(model.config, device.platform).shape_s,
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
