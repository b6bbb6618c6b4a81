"""Texts in, embeddings out, as the release's `encode` computes them:

    instruction + text -> tokenizer (truncate at max_length, `<s> ... </s>` kept)
      -> encoder with the task's adapter -> mean pool over real tokens
      -> Matryoshka truncation -> L2 normalisation -> float32 [N, D] in input order

Batching. The input is read a window of texts at a time. In a window, texts are grouped by task
and sorted by length, longest first, and each gets the smallest rung of a fixed length ladder
(`tokenize.WIDTHS`: twelve rungs an octave) that holds it. A batch has the width of its longest
text (or of a wider shape the plan already uses) and a row count from a fixed set per width
(`batch_size`, capped by a token budget, or a power of two below that), so every shape is one
of `shapes` and compiles once. Where the cuts go is priced (`cost.py`): each (rows, width) has
a predicted time (a per-call cost, a floor below which a small batch runs no faster, the dense
layers per token, attention per key, a dearer token past a knee), and the plan is the cheapest
cut of the sorted texts into batches, found by dynamic programming: it merges rungs where a
call or a small batch costs more than the padding (a GPU, queries), splits where padding or a
batch past the knee costs more (long texts on a CPU), and prices each shape a plan adds (a
compile) so that a stream meets few. A new shape must save its compile within `PAYBACK_S` of
encode work: a call that long pays the whole compile, a shorter one (a few hundred texts, made
again and again) the share of it that its repeats would. The plan depends on the call's texts
alone, never on earlier calls, so a call's embeddings are the same bits whatever ran before.
The cost is the device's default for the model (scaled by its FLOPs) unless `cost.calibrate`
timed this device and model once and cached a fit.
`plan(..., cost=None)` is the padding rule alone (texts up to two rungs shorter share a batch).

Pipelining. A batch is dispatched without waiting for the one before it (JAX dispatch is
asynchronous), so the host pads the next batch, and tokenizes the next window, while the device
runs. At most `IN_FLIGHT` batches are outstanding.

Streaming. `iter_encode` takes any iterable and yields one embedding per text, in input order,
holding at most two windows of texts and results; `encode` collects it into one array.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from .cost import CostModel, for_model
from .tokenize import (
    WIDTHS,
    bucket_for,
    check_max_length,
    check_texts,
    pad,
    position_limit,
    token_ids,
)

DEFAULT_MAX_LENGTH = 8192
DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_WINDOW = 16384
IN_FLIGHT = 2
PROGRESS_MIN_BATCHES = 10
PAYBACK_S = 75.0  # seconds of encode work within which a new shape must save its compile
PAYBACK_CALLS = 8  # ... and within at most this many repeats of the call
SHAPES_DOUBLING = 32  # shapes a stream has met per doubling of a new shape's price (see plan)
NEIGHBOURS = 2 ** (1 / 6)  # how much shorter a text may be and still share a batch (see plan)
# A filler row for incomplete batches: "<s></s>", two real tokens, so nothing divides by zero.
FILLER = [0, 2]


@dataclasses.dataclass(frozen=True)
class Batch:
    task: str | None | tuple  # one task for every row, or (mixed plans) one per row
    width: int
    rows: int
    members: tuple[int, ...]  # window indices of the texts in rows 0.. (the rest is filler)


def row_cap(width: int, batch_size: int, token_budget: int) -> int:
    """The rows of a full batch of `width`: `batch_size` capped by the token budget."""
    return max(1, min(batch_size, token_budget // width))


def rows_for(width: int, count: int, batch_size: int, token_budget: int) -> int:
    """Rows of a batch of `width` for `count` texts: a full batch, or for fewer texts the next
    power of two (so a task's tail adds few shapes)."""
    return min(row_cap(width, batch_size, token_budget), 1 << max(0, count - 1).bit_length())


def plan(
    lengths: Sequence[int],
    row_tasks: Sequence,
    limit: int,
    batch_size: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    row_multiple: int = 1,
    *,
    ladder: tuple[int, ...] = WIDTHS,
    mixed: bool = False,
    cost: CostModel | None = None,
    known: frozenset = frozenset(),
) -> list[Batch]:
    """The batches for texts of these token `lengths` and tasks (see the module docstring).
    cost: the price of a batch shape (`cost.CostModel`; what `Runner` and so `encode` pass):
    the plan is then the cheapest cut of each task's length-sorted texts into batches of shapes
    from `shapes`; None: the padding rule alone (texts up to two rungs shorter share a batch).
    mixed=True puts texts of any task in one batch (its `task` is then one name per row, filler
    rows None), for the per-row adapter path. One task's batches follow each other (each task's
    merged weights are made once per window, however many tasks there are), longest first: a
    shape that cannot fit in memory fails before that task's other work is done."""
    groups = collections.defaultdict(list)
    for i, task in enumerate(row_tasks):
        groups[None if mixed else task].append(i)
    sorted_widths = {}
    for task, members in sorted(groups.items(), key=lambda kv: kv[0] or ""):
        members.sort(key=lambda i: -lengths[i])
        sorted_widths[task] = [bucket_for(lengths[i], limit, ladder) for i in members]
    price = 0.0
    if cost is not None:
        widths_by_task = sorted_widths.values()
        price = new_shape_price(cost, widths_by_task, batch_size, token_budget, row_multiple, known)
    batches, chosen = [], set(known)
    for task, widths in sorted_widths.items():
        members = groups[task]
        cut = (
            padding_cut(widths, batch_size, token_budget, row_multiple)
            if cost is None
            else priced_cut(widths, cost, batch_size, token_budget, row_multiple, chosen, price)
        )
        for start, end, rows, width in cut:
            taken = tuple(members[start:end])
            if mixed:
                task = tuple(row_tasks[i] for i in taken) + (None,) * (rows - len(taken))
            batches.append(Batch(task, width, rows, taken))
            chosen.add((rows, width))  # a later task's batches may run in it for free
    return batches


def new_shape_price(cost, groups, batch_size, token_budget, row_multiple, known) -> float:
    """What one more shape costs a window's plan: `cost.shape_s` (a compile) times the share
    of the window's predicted time in PAYBACK_S (at most all of it, at least 1 /
    PAYBACK_CALLS), doubled for every SHAPES_DOUBLING shapes the stream has met (`known`).
    `groups`: each task's descending widths."""
    # A compile is paid once and then saves on every later call: a new shape must save it
    # within PAYBACK_S of encode work, within this call alone when it is that long, else over
    # repeats of it (a call of a few hundred texts, made all day, may add the shapes that make
    # it fast), but within PAYBACK_CALLS repeats at most: other calls' lengths need other
    # shapes, and where a call takes milliseconds (a GPU, a small model) a compile is still
    # seconds. The window's time is that of its cheapest plan with shapes free.
    window_s = 0.0
    for widths in groups:
        steady = cheapest_cut(widths, cost, batch_size, token_budget, row_multiple, None, 0.0)
        window_s += sum(cost.seconds(rows, width) for _, _, rows, width in steady)
    # A stream keeps every shape it compiled (in memory): each SHAPES_DOUBLING shapes it has
    # met double the price of one more, so a long stream settles on a set it reuses.
    share = max(1.0 / PAYBACK_CALLS, min(1.0, window_s / PAYBACK_S))
    return cost.shape_s * share * 2 ** (len(known) / SHAPES_DOUBLING)


def batch_rows(
    width: int, count: int, batch_size: int, token_budget: int, row_multiple: int = 1
) -> int:
    """`rows_for`, rounded up to a multiple of `row_multiple` (so every device gets rows)."""
    return -(-rows_for(width, count, batch_size, token_budget) // row_multiple) * row_multiple


def padding_cut(
    widths: Sequence[int], batch_size: int, token_budget: int, row_multiple: int = 1
) -> list[tuple[int, int, int, int]]:
    """[(start, end, rows, width)] batches of the descending `widths` by padding alone: a batch
    takes the texts up to a sixth of an octave (two rungs) shorter than its first, then, where
    fewer are left than a full batch, the next shorter texts fill the rows that would be
    filler."""
    cut, start = [], 0
    while start < len(widths):
        width = widths[start]
        cap = row_cap(width, batch_size, token_budget)
        # Texts two rungs shorter join the batch: a rung's few texts then fill a full batch
        # instead of a short tail of their own, which keeps the shapes a long stream meets few
        # (94 instead of 199 over 40 windows of a lognormal length mix).
        near = start
        while near < len(widths) and near - start < cap and widths[near] * NEIGHBOURS >= width:
            near += 1
        rows = batch_rows(width, near - start, batch_size, token_budget, row_multiple)
        end = min(len(widths), start + rows)
        cut.append((start, end, rows, width))
        start = end
    return cut


def priced_cut(
    widths: Sequence[int],
    cost: CostModel,
    batch_size: int,
    token_budget: int,
    row_multiple: int = 1,
    known: set | frozenset = frozenset(),
    price: float | None = None,
) -> list[tuple[int, int, int, int]]:
    """[(start, end, rows, width)] batches of the descending `widths` with the least predicted
    time: a batch from text i holds texts i.. at the width of text i, in the rows `batch_rows`
    gives, or in a wider shape already chosen (so every shape is one of `shapes`'). Dynamic
    programming over the cut points, O(texts x rows per batch): merging rungs (a wider, fuller
    batch), filling rows or splitting, whichever `cost` prices lower. price: of a shape not in
    `known` (default: `new_shape_price` of these widths alone)."""
    if price is None:
        price = new_shape_price(cost, [widths], batch_size, token_budget, row_multiple, known)
    # Pass 1 prices every batch as a new shape, which favours few, full batches; pass 2 lets
    # the shapes pass 1 chose (and `known` ones) go free of that price, so a new shape comes
    # in only where it saves more than its price, and a few texts that a free shape holds
    # (wider or with more rows than theirs) run in it where that costs less than their own.
    first = cheapest_cut(widths, cost, batch_size, token_budget, row_multiple, None, price)
    free = set(known) | {(rows, width) for _, _, rows, width in first}
    return cheapest_cut(widths, cost, batch_size, token_budget, row_multiple, free, price)


def cheapest_cut(
    widths, cost, batch_size, token_budget, row_multiple, free, shape_price: float
) -> list[tuple[int, int, int, int]]:
    """`priced_cut`'s dynamic programme: each batch costs `cost.seconds`, plus `shape_price`
    unless its shape is in `free` (None: none is); a batch may also take a free shape wider
    than its first text (as many texts as that shape has rows)."""
    n = len(widths)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    prev = np.zeros(n + 1, np.int64)
    # width -> (seconds of a batch of 1..cap texts from a text of that width, and the
    # (rows, width) each takes)
    prices: dict[int, tuple[np.ndarray, list]] = {}
    for i in range(n):
        width = widths[i]
        if width not in prices:
            prices[width] = batch_prices(
                width, cost, batch_size, token_budget, row_multiple, free, shape_price
            )
        price = prices[width][0]
        m = min(len(price), n - i)
        candidate = best[i] + price[:m]
        ends = best[i + 1 : i + 1 + m]  # a view: updated in place
        better = candidate < ends  # ties keep the earlier start: fewer, fuller batches
        ends[better] = candidate[better]
        prev[i + 1 : i + 1 + m][better] = i
    cut, end = [], n
    while end > 0:
        start = int(prev[end])
        rows, width = prices[widths[start]][1][end - start - 1]
        cut.append((start, end, rows, width))
        end = start
    return cut[::-1]


def batch_prices(
    width: int,
    cost: CostModel,
    batch_size: int,
    token_budget: int,
    row_multiple: int,
    free: set | frozenset | None,
    shape_price: float,
) -> tuple[np.ndarray, list]:
    """`cheapest_cut`'s price of a batch of 1..cap texts whose first (longest) is `width`
    wide: its own shape (`batch_rows` rows at `width`, plus `shape_price` unless free), or a
    free wider shape with room for them where that costs less. Returns the seconds [cap] and
    the (rows, width) of each."""
    cap = row_cap(width, batch_size, token_budget)
    choice = [
        (batch_rows(width, k, batch_size, token_budget, row_multiple), width)
        for k in range(1, cap + 1)
    ]
    price = np.array(
        [
            cost.seconds(*shape) + (0.0 if free and shape in free else shape_price)
            for shape in choice
        ]
    )
    for rows, wider in sorted(free) if free else ():
        if wider > width:
            seconds = cost.seconds(rows, wider)
            room = min(rows, cap)
            cheaper = np.flatnonzero(seconds < price[:room])
            price[cheaper] = seconds
            for k in cheaper:
                choice[k] = (rows, wider)
    return price, choice


# plan's batching parameters, packed (the formatter would write one a line).
def shapes(
    limit: int, max_length: int, batch_size: int, token_budget: int = DEFAULT_TOKEN_BUDGET,
    row_multiple: int = 1, ladder: tuple[int, ...] = WIDTHS,
) -> list[tuple[int, int]]:  # fmt: skip
    """Every (rows, width) that `plan` can give texts of at most `max_length` tokens: what to
    compile ahead to never compile later."""
    top = bucket_for(max_length, limit, ladder)
    out = []
    for width in sorted({w for w in ladder if w < top} | {top}):
        cap = row_cap(width, batch_size, token_budget)
        counts = {min(cap, 1 << k) for k in range(cap.bit_length() + 1)}
        out += [(-(-rows // row_multiple) * row_multiple, width) for rows in sorted(counts)]
    return sorted(set(out), key=lambda s: (s[1], s[0]))


def padding_fraction(batches: Sequence[Batch], lengths: Sequence[int]) -> float:
    """Padded positions (filler rows included) per real token of a plan."""
    real = sum(lengths[i] for b in batches for i in b.members)
    return sum(b.rows * b.width for b in batches) / max(real, 1) - 1.0


PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")


def quantize(embeddings, precision: str, ranges=None) -> np.ndarray:
    """sentence-transformers' `quantize_embeddings` on float embeddings [N, D] (or [D]): the same
    dtypes, bit packing and calibration. int8/uint8: each dimension's [min, max] (from `ranges`
    [2, D], else from these embeddings) cut into 256 buckets; binary/ubinary: one bit per
    dimension (> 0), packed big-endian into bytes, a row's last byte zero-padded (binary: minus
    128, as int8)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    emb = np.asarray(embeddings, np.float32)
    if precision == "float32":
        return emb
    if precision.endswith("binary"):
        bits = np.packbits(emb > 0, axis=-1)
        return bits if precision == "ubinary" else (bits - 128).astype(np.int8)
    if ranges is None:
        if emb.ndim == 1 or emb.shape[0] < 2:
            raise ValueError(
                f"{precision} needs `ranges` (per-dimension [min, max], shape "
                f"[2, D]) to quantize a single embedding"
            )
        ranges = np.vstack((emb.min(axis=0), emb.max(axis=0)))
    ranges = np.asarray(ranges, np.float32)
    if ranges.shape != (2, emb.shape[-1]):
        raise ValueError(
            f"ranges must have shape [2, {emb.shape[-1]}] (min and max per "
            f"dimension), got {list(ranges.shape)}"
        )
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((emb - starts) / steps), 0, 255)
    return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)


def check_output(output_value, precision) -> None:
    """Checks encode's `output_value` and `precision` (and that the two go together)."""
    if output_value not in OUTPUT_VALUES:
        raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got {output_value!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if output_value == "token_embeddings" and precision != "float32":
        raise ValueError(
            "token embeddings come as float32: precision applies to sentence embeddings only"
        )


# The encode arguments `check_options` checks.
CHECKED = (
    "batch_size",
    "max_length",
    "truncate_dim",
    "max_tokens_per_batch",
    "window",
    "precision",
    "ranges",
    "output_value",
)


def check_options(
    model,
    *,
    batch_size,
    max_length,
    truncate_dim,
    max_tokens_per_batch,
    window,
    precision="float32",
    ranges=None,
    output_value="sentence_embedding",
    streaming=False,
) -> tuple[int, int]:
    """Checks encode's options; returns (max_length, output dimension). truncate_dim None: the
    config's."""
    cfg = model.config
    check_output(output_value, precision)
    if streaming and precision.endswith("int8") and ranges is None:
        raise ValueError(
            f"a stream of {precision} embeddings needs `ranges` (per-dimension "
            "[min, max], shape [2, D]): calibrating on the embeddings themselves "
            "needs all of them (use encode)"
        )
    max_length = check_max_length(max_length, cfg, DEFAULT_MAX_LENGTH)
    truncate_dim = cfg.truncate_dim if truncate_dim is None else truncate_dim
    for name, value in (
        ("batch_size", batch_size),
        ("max_tokens_per_batch", max_tokens_per_batch),
        ("window", window),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if truncate_dim is not None:
        if not isinstance(truncate_dim, int) or not 1 <= truncate_dim <= cfg.hidden_size:
            raise ValueError(f"truncate_dim must be in 1..{cfg.hidden_size}, got {truncate_dim!r}")
        if truncate_dim not in cfg.matryoshka_dimensions:
            warnings.warn(
                f"truncate_dim={truncate_dim} is not one of the dimensions the model was "
                f"trained for {list(cfg.matryoshka_dimensions)}",
                stacklevel=2,
            )
    return max_length, truncate_dim or cfg.hidden_size


# encode and iter_encode take the same keywords (sentence-transformers' names), packed: the
# formatter would write one a line.
def encode(
    model, texts, *, task=None, prompt=None, batch_size=32, max_length=None, truncate_dim=None,
    normalize=True, show_progress_bar=None, max_tokens_per_batch=DEFAULT_TOKEN_BUDGET,
    window=DEFAULT_WINDOW, precision="float32", ranges=None, output_value="sentence_embedding",
):  # fmt: skip
    """See `JinaEmbeddingsV3.encode`."""
    options = dict(locals())  # the first statement: the arguments alone
    del options["model"], options["texts"], options["precision"], options["ranges"]
    check_output(output_value, precision)  # iter_encode checks the rest
    single = isinstance(texts, str)
    # Quantisation comes after, over all rows: int8/uint8 calibrate on them without `ranges`.
    rows = list(iter_encode(model, [texts] if single else texts, **options))
    truncate_dim = model.config.truncate_dim if truncate_dim is None else truncate_dim
    dim = truncate_dim or model.config.hidden_size
    if output_value == "token_embeddings":
        return rows[0] if single else rows
    emb = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    emb = quantize(emb, precision, ranges) if len(emb) else quantize(emb, "float32")
    return emb[0] if single else emb


def _texts_and_tasks(model, texts, task) -> tuple[Iterator, Iterator, int | None]:
    """(texts, one adapter name per text, count or None) for a sequence or any iterable."""
    if texts is None or isinstance(texts, (str, bytes, dict)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if isinstance(texts, Sequence):
        check_texts(texts)
        return iter(texts), iter(model.resolve_tasks(task, len(texts), "texts")), len(texts)
    if task is not None and not isinstance(task, str):
        raise TypeError(
            "with an iterator of texts, task must be one task name or None "
            "(per-text tasks need a list of texts)"
        )
    name = None if task is None else model.resolve_task(task)

    def checked():
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not a string")
            yield t

    return checked(), itertools.repeat(name), None


class Runner:
    """Runs sets of token-id rows through the model in planned batches, at most `IN_FLIGHT`
    outstanding: `submit` dispatches a set and returns its output container, complete after
    `drain`. hidden=False: mean-pooled fp32 [N, H]; hidden=True: one float32 [n_tokens, H] per
    row (its real tokens). cost: what the plan prices batch shapes with (default
    `cost.for_model(model)`: this device's calibration if cached, else its default); None for
    the padding rule alone. `timeline`: set it to a list and every batch appends
    (batch, dispatch start, dispatch end, wait start, result ready) in `time.perf_counter`
    seconds (what `benchmarks/encode_throughput.py --profile` prints)."""

    def __init__(
        self,
        model,
        batch_size: int,
        token_budget: int,
        hidden: bool,
        bar,
        *,
        ladder: tuple[int, ...] = WIDTHS,
        mixed: bool = False,
        cost: CostModel | Literal["device"] | None = "device",
        stats=None,
    ):
        self.model, self.batch_size, self.token_budget = model, batch_size, token_budget
        self.hidden, self.bar, self.ladder, self.mixed = hidden, bar, ladder, mixed
        self.cost = for_model(model) if cost == "device" else cost
        self.stats = stats  # a Stats to count into, or None
        self.limit = position_limit(model.config)
        self.in_flight: collections.deque = collections.deque()
        self.timeline: list | None = None
        self.seen: set = set()  # shapes run so far: a later window's plan reuses them first

    def plan(self, ids: Sequence[np.ndarray], tasks: Sequence) -> list[Batch]:
        return plan(
            [len(x) for x in ids],
            tasks,
            self.limit,
            self.batch_size,
            self.token_budget,
            self.model.row_multiple,
            ladder=self.ladder,
            mixed=self.mixed,
            cost=self.cost,
            known=frozenset(self.seen),
        )

    def shapes(self, max_length: int) -> list[tuple[int, int]]:
        """Every (rows, width) this runner can run for texts of at most `max_length` tokens."""
        return shapes(
            self.limit,
            max_length,
            self.batch_size,
            self.token_budget,
            self.model.row_multiple,
            self.ladder,
        )

    def submit(
        self, ids: Sequence[np.ndarray], tasks: Sequence, batches=None, adapters=None
    ) -> Any:
        """Dispatches these rows (`batches`: their plan, default `self.plan(ids, tasks)`;
        `adapters`: an `adapters.AdapterSet` whose fixed layout the mixed path runs on).
        Returns the output container: a list of arrays (hidden=True) or one array."""
        model, cfg = self.model, self.model.config
        out = (
            [None] * len(ids) if self.hidden else np.zeros((len(ids), cfg.hidden_size), np.float32)
        )
        run = model.hidden if self.hidden else model.pooled
        for batch in self.plan(ids, tasks) if batches is None else batches:
            started = time.perf_counter()
            rows = [ids[i] for i in batch.members]
            rows += [FILLER] * (batch.rows - len(rows))
            array, lengths = pad(rows, batch.width, cfg.pad_token_id)
            if self.stats is not None:
                self.stats.add(batch, lengths)
            layout = {} if adapters is None else {"adapters": adapters}
            result = run(array, lengths, batch.task, merge=not self.mixed, **layout)
            times = [batch, started, time.perf_counter()]
            self.seen.add((batch.rows, batch.width))
            self.in_flight.append((out, batch.members, lengths, result, times))
            if len(self.in_flight) > IN_FLIGHT:
                self._collect()
        return out

    def drain(self):
        while self.in_flight:
            self._collect()

    def _collect(self):
        out, members, lengths, result, times = self.in_flight.popleft()
        times.append(time.perf_counter())
        result = np.asarray(result)
        if self.timeline is not None:
            self.timeline.append(tuple(times) + (time.perf_counter(),))
        if self.hidden:
            for row, member in enumerate(members):
                out[member] = result[row, : lengths[row]].astype(np.float32)
        else:
            out[list(members)] = result[: len(members)]
        self.bar.update(len(members))


@dataclasses.dataclass
class Stats:
    """What a run's batches held, counted as they are dispatched (`iter_encode(stats=...)`):
    texts, real tokens (instruction and `<s>`/`</s>` included), padded positions (filler rows
    included) and batches."""

    texts: int = 0
    tokens: int = 0
    padded: int = 0
    batches: int = 0

    def add(self, batch: Batch, lengths: np.ndarray) -> None:
        self.texts += len(batch.members)
        self.tokens += int(lengths[: len(batch.members)].sum())
        self.padded += batch.rows * batch.width
        self.batches += 1

    @property
    def padding(self) -> float:
        """Padded positions per real token, minus one (as `padding_fraction`)."""
        return self.padded / max(self.tokens, 1) - 1.0


def finish(pooled: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    """Matryoshka truncation to `dim`, then L2 normalisation: float32 [N, dim]."""
    emb = pooled[:, :dim]
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(emb, np.float32)


def progress(count: int | None, batch_size: int, show: bool | None, desc: str = "encode"):
    """The progress bar (stderr): by default on for long jobs only (unknown length: off)."""
    if show is None:
        show = count is not None and count >= PROGRESS_MIN_BATCHES * batch_size
    return tqdm(total=count, disable=not show, file=sys.stderr, desc=desc, unit="text")


def iter_encode(
    model, texts, *, task=None, prompt=None, batch_size=32, max_length=None, truncate_dim=None,
    normalize=True, show_progress_bar=None, max_tokens_per_batch=DEFAULT_TOKEN_BUDGET,
    window=DEFAULT_WINDOW, precision="float32", ranges=None, output_value="sentence_embedding",
    stats=None,
) -> Iterator[np.ndarray]:  # fmt: skip
    """One embedding per text of `texts` (any iterable of strings), in input order, holding at
    most two windows of `window` texts: [D] in `precision` ([D / 8] bytes for the binary ones;
    int8/uint8 need `ranges` here), or for output_value="token_embeddings" float32 [n_tokens, H].
    Same arguments as `encode`; `stats`: a `Stats` that counts the batches as they run."""
    arguments = dict(locals())  # the first statement: the arguments alone
    cfg = model.config
    checked = {name: arguments[name] for name in CHECKED}
    max_length, dim = check_options(model, **checked, streaming=True)
    tokens_out = output_value == "token_embeddings"
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    text_iter, task_iter, count = _texts_and_tasks(model, texts, task)

    def windows():
        while True:
            chunk = list(itertools.islice(text_iter, window))
            if not chunk:
                return
            tasks = list(itertools.islice(task_iter, len(chunk)))
            yield token_ids(model.tokenizer, cfg, chunk, tasks, max_length, prompt), tasks

    with progress(count, batch_size, show_progress_bar) as bar:
        runner = Runner(model, batch_size, max_tokens_per_batch, tokens_out, bar, stats=stats)
        upcoming = windows()
        current = next(upcoming, None)
        while current is not None:
            out = runner.submit(*current)
            # The next window is tokenized while this one's last batches run.
            current = next(upcoming, None)
            runner.drain()
            if tokens_out:
                yield from out
            else:
                yield from quantize(finish(out, dim, normalize), precision, ranges)
