"""Dynamic batching: texts from any number of callers, run together through one model.

One worker thread owns the model. Callers `submit` a request (its texts, one task per text, the
output dimension) and get a `Job` whose `future` resolves to (embeddings float32 [n, dim],
tokens). The worker waits for a first request, then for more, until the texts waiting would fill
`max_batch_tokens` padded tokens or `max_wait_ms` have passed since the oldest of them arrived;
then it takes texts first in, first out up to that budget (at least one text), plans them with
`encode.plan` in mixed mode (any tasks in one batch: the per-row adapter path, one compiled
structure for every mix of tasks), runs them, and answers each request whose texts are all done.
A request larger than one round spans several rounds. A cancelled request's texts that have not
run yet are dropped.

Shapes. Widths are the rungs of `tokenize.SERVE_WIDTHS` (three an octave, up to `max_length`'s),
rows powers of two up to the budget's share (`Runner.shapes`): a fixed set (100 shapes for
max_length 512, 134 for 8192, with the defaults) that `warm_up` compiles ahead (several at a
time), so nothing compiles while serving. The plan prices a compile only for shapes not ready
(`ready`); until all are, a batch whose shape is not ready runs in a ready one that holds it
where that is cheaper than compiling (`covered`). Every text's embedding equals `encode()` of it alone: the
batch only adds padding rows and positions, which the forward masks.

Limits. At most `max_queue` texts wait (submitted, not yet taken into a round): beyond that
`submit` raises `QueueFull` with a retry estimate from the recent throughput, so memory stays
bounded under any load.

Late chunking. A request with `late=True` is one document made of its texts joined by a space,
each text a chunk (as `late_chunking.encode_late_chunks` does); it runs on its own, between
rounds, `late_rows` windows a forward (`late_shapes`, compiled by `warm_up` too), so a cancel
is seen between forwards. Documents are capped at `max_late_chars` characters (`submit` raises
`DocumentTooLong`).

Tokenizing. A request's texts are tokenized in pieces (`TOKENIZE_PIECE` texts, at most
`TOKENIZE_PIECE_CHARS` characters), a cancel seen between pieces; each text only as far as
`max_length` needs (`tokenize.truncated_ids`). Once a request is tokenized its texts are let go
(its rows hold the ids): a request's memory past that point is what `max_length` needs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .adapters import AdapterSet
from .encode import DEFAULT_MAX_LENGTH, FILLER, Batch, Runner, finish, progress
from .late_chunking import prepare_document
from .metrics import Counter, Gauge, Histogram, Registry
from .tokenize import (
    BUCKETS,
    SERVE_WIDTHS,
    bucket_for,
    check_max_length,
    pad,
    position_limit,
    token_ids,
)

LADDER = SERVE_WIDTHS
LATE_SEPARATOR = " "
TOKENIZE_PIECE = 64  # texts tokenized at a time: a cancel is seen between pieces
# ... and characters, so that a piece of texts tokenized whole (no provable cut: see
# tokenize.truncated_ids) is seen through in about a second.
TOKENIZE_PIECE_CHARS = 2**20
LATE_ROWS = 8  # late-chunking windows per forward, at most
UNTRUNCATED = 2**31 - 1
# `ready_shapes`: shapes of at most this many padded positions compile before the server
# answers (10 of the 134 for max_length 8192: single texts up to 64 tokens, small batches of
# shorter ones), the rest in the background; meanwhile a batch runs in a ready shape that holds
# it where that is cheaper than compiling its own (`Batcher.covered`).
READY_TOKENS = 64
# Shapes `warm_up` readies at once: XLA compiles one on one core, so one per core, a few at most
# (each holds its compiler's memory).
WARM_UP_THREADS = max(1, min(4, os.cpu_count() or 1))


class QueueFull(Exception):
    """More texts are waiting than the queue holds; `retry_after` seconds is an estimate of
    when there will be room."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        super().__init__(
            f"{waiting} texts are waiting, the queue holds {limit}; retry in {retry_after} s"
        )
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher is shutting down and takes no new requests."""


class DocumentTooLong(ValueError):
    """A late-chunking document (its texts joined) is over `max_late_chars` characters."""


class TooLong(ValueError):
    """A text of a request that asked not to be truncated has more tokens than `max_length`."""

    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(
            f"input[{index}] has {tokens} tokens (instruction and <s>/</s> "
            f"included), over this server's limit of {limit}; send truncate true "
            "to cut it there, or split it"
        )
        self.index, self.tokens, self.limit = index, tokens, limit


@dataclasses.dataclass(eq=False)
class Job:
    texts: list[str] | None  # None once tokenized (rows hold the ids)
    tasks: list  # one adapter name (or None) per text
    dim: int
    normalize: bool = True
    late: bool = False
    truncate: bool = True  # False: a text over max_length fails the job (TooLong)
    adapters: Any = None  # the AdapterSet it was submitted under (None: the model's own)
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    tokens: int = 0
    pooled: np.ndarray | None = None
    remaining: int = 0

    @property
    def count(self) -> int:
        """Its number of texts (one task each), still known once the texts are let go."""
        return len(self.tasks)

    def held_texts(self) -> list[str]:
        """Its texts, which a job holds until they are tokenized."""
        if self.texts is None:
            raise RuntimeError("the job's texts were let go when it was tokenized")
        return self.texts


def resolve(job: Job, result=None, error: BaseException | None = None):
    """Sets the job's outcome unless it is already settled (cancelled by its caller)."""
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def pieces(texts: list[str]):
    """Slices of `texts`: `TOKENIZE_PIECE` texts, fewer where they pass `TOKENIZE_PIECE_CHARS`
    characters (at least one text each)."""
    start = 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and end - start < TOKENIZE_PIECE:
            chars += len(texts[end])
            if chars > TOKENIZE_PIECE_CHARS and end > start:
                break
            end += 1
        yield slice(start, end)
        start = end


@dataclasses.dataclass(eq=False)
class Row:
    job: Job
    index: int
    ids: np.ndarray
    width: int


class Batcher:
    def __init__(
        self,
        model,
        *,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        max_wait_ms: float = 2.0,
        max_queue: int = 4096,
        max_length: int | None = None,
        registry: Registry | None = None,
        max_late_chars: int = 65536,
        adapters: AdapterSet | None = None,
    ):
        for name, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("max_batch_size", max_batch_size),
            ("max_queue", max_queue),
            ("max_late_chars", max_late_chars),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < math.inf:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.model = model
        # The tasks requests may name, in the fixed layout every forward stacks: replaced
        # (never changed in place) when an adapter is loaded or removed; a job keeps the set
        # it was submitted under.
        self.adapters = adapters if adapters is not None else AdapterSet.build(model)
        self.max_length = check_max_length(max_length, model.config, DEFAULT_MAX_LENGTH)
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000
        self.max_queue, self.max_late_chars = max_queue, max_late_chars
        self.limit = position_limit(model.config)
        self.runner = Runner(
            model,
            max_batch_size,
            max_batch_tokens,
            hidden=False,
            bar=progress(None, 1, False),
            ladder=LADDER,
            mixed=True,
        )
        # Shapes whose executable is ready (warmed, or run once): the plan's known shapes, so
        # it prices a compile only for a shape that needs one (with the runner's own record
        # of shapes run, a warmed server priced one for every shape it had not run yet, and
        # merged a round's texts into few wide, padded batches). Until all of `shapes()` are
        # ready, a batch whose shape is not runs in a ready one that holds it where that is
        # predicted cheaper than compiling (`covered`).
        self.ready: set[tuple[int, int]] = self.runner.seen
        self.shape_count = len(self.shapes())
        self.cond = threading.Condition()
        self.inbox: collections.deque[Job] = collections.deque()
        self.rows: collections.deque[Row] = collections.deque()
        self.late: collections.deque[Job] = collections.deque()
        self.waiting = 0  # texts submitted and not yet taken into a round
        self.closing = False
        self.any_cancelled = False  # a job was cancelled since the rows were last scanned
        self.thread: threading.Thread | None = None
        self.rate = 0.0  # texts per second over recent rounds (for retry estimates)
        self.registry = registry if registry is not None else Registry()
        add = self.registry.add
        # One metric a line (the formatter would spread each over five).
        # fmt: off
        self.texts_total = add(Counter("jina_jax_texts_total", "Texts embedded."))
        self.tokens_total = add(Counter("jina_jax_tokens_total", "Real tokens embedded (instruction and specials included)."))
        self.padded_total = add(Counter("jina_jax_padded_tokens_total", "Positions computed, padding and filler rows included."))
        self.batches_total = add(Counter("jina_jax_batches_total", "Forward batches run."))
        self.cancelled_total = add(Counter("jina_jax_cancelled_texts_total", "Texts dropped before running: their client left."))
        self.batch_rows = add(Histogram("jina_jax_batch_rows", "Texts per forward batch.", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]))
        self.batch_tokens = add(Histogram("jina_jax_batch_padded_tokens", "Padded positions per forward batch.", [2**k for k in range(4, 17)]))
        self.round_tasks = add(Histogram("jina_jax_batch_tasks", "Distinct tasks (no adapter counts as one) per batch.", [1, 2, 3, 4, 5, 6]))
        # fmt: on
        add(Gauge("jina_jax_queue_depth", "Texts waiting to run.", lambda: self.waiting))
        add(
            Gauge(
                "jina_jax_compiles",
                "Forward compilations since the start.",
                lambda: model.compile_count,
            )
        )

    # --- setup -----------------------------------------------------------------------------

    def shapes(self) -> list[tuple[int, int]]:
        """The (rows, width) shapes this batcher's rounds run, smallest (rows x width) first:
        the shapes of short requests, which most are, come first (`warm_up` compiles them, and
        `late_shapes`)."""
        return sorted(self.runner.shapes(self.max_length), key=lambda s: (s[0] * s[1], s[1]))

    def ready_shapes(self, tokens: int = READY_TOKENS) -> list[tuple[int, int]]:
        """The first shapes to compile before answering: those of at most `tokens` padded
        positions (single texts up to that length, small batches of short ones); the others
        can compile in the background (`warm_up(shapes=...)`) while the server answers."""
        return [s for s in self.shapes() if s[0] * s[1] <= tokens]

    def warm_up(
        self,
        on_shape: Callable[[int, int], None] | None = None,
        stop: Callable[[], bool] | None = None,
        shapes=None,
        late: bool = True,
        threads: int = WARM_UP_THREADS,
    ) -> int:
        """Compiles (or loads from the executable store) `shapes` (default: every shape) and,
        with `late`, the late-chunking forwards' `late_shapes`, without running them where the
        store is on; returns how many. `threads` shapes at a time, taken in order (XLA's
        compile releases the GIL: on a multi-core host they compile side by side).
        `on_shape(done, total)` after each; `stop()` true ends it early (after the shapes being
        readied). Safe beside a running worker: a round that needs a shape not ready yet waits
        for the thread readying it, or readies it itself (it waits, it never fails)."""
        shapes = self.shapes() if shapes is None else list(shapes)
        work = [(shape, False) for shape in shapes]
        work += [(shape, True) for shape in (self.late_shapes() if late else [])]
        self.adapters.lora  # noqa: B018 - stacked once, before threads share the set
        queue, lock, done = collections.deque(work), threading.Lock(), [0]

        def worker():
            while True:
                with lock:
                    if not queue or (stop is not None and stop()):
                        return
                    (rows, width), hidden = queue.popleft()
                self._ready(rows, width, hidden)
                with lock:
                    done[0] += 1
                    if on_shape is not None:
                        on_shape(done[0], len(work))

        count = max(1, min(int(threads), len(work)))
        if count == 1:
            worker()
        else:
            with concurrent.futures.ThreadPoolExecutor(count, "jina-jax warm-up") as pool:
                for future in [pool.submit(worker) for _ in range(count)]:
                    future.result()
        return done[0]

    def _ready(self, rows: int, width: int, hidden: bool):
        """One shape's executable made ready (run once where only a call compiles it)."""
        model = self.model
        ids, lengths = pad([FILLER] * rows, width, model.config.pad_token_id)
        tasks = [None] * rows
        inputs = {"merge": False, "adapters": self.adapters}
        prepare, run = (
            (model.prepare_hidden, model.hidden) if hidden else (model.prepare_pooled, model.pooled)
        )
        if not prepare(ids, lengths, tasks, **inputs):
            np.asarray(run(ids, lengths, tasks, **inputs))
        if not hidden:
            self.ready.add((rows, width))

    def covered(self, batch: Batch) -> Batch:
        """`batch`, or the same texts in the cheapest ready shape that holds them (more filler
        rows, more padding: the forward masks both, the texts' outputs are theirs alone) when
        its own shape is not ready and that costs less than compiling it (`cost.shape_s`)."""
        shape, cost = (batch.rows, batch.width), self.runner.cost
        if shape in self.ready or cost is None:
            return batch
        own = cost.seconds(*shape) + cost.shape_s
        best = min(
            (
                (cost.seconds(r, w), r, w)
                for r, w in list(self.ready)
                if r >= batch.rows and w >= batch.width
            ),
            default=None,
        )
        if best is None or best[0] >= own:
            return batch
        _, rows, width = best
        task = batch.task
        if isinstance(task, tuple):  # one per row: the added rows are filler
            task = task + (None,) * (rows - len(task))
        return Batch(task, width, rows, batch.members)

    def start(self) -> Batcher:
        self.thread = threading.Thread(target=self._work, name="jina-jax batcher", daemon=True)
        self.thread.start()
        return self

    def close(self, timeout: float | None = None):
        """Takes no new requests, finishes the ones taken, stops the worker."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    # --- callers ---------------------------------------------------------------------------

    def submit(
        self,
        texts: list[str],
        tasks: list,
        dim: int,
        normalize: bool = True,
        late: bool = False,
        truncate: bool = True,
    ) -> Job:
        """Queues a request (texts checked by the caller; one adapter name or None per text,
        names of the current `adapters` set, which the job keeps). truncate=False: the job
        fails with `TooLong` if a text has over `max_length` tokens (late chunking never
        truncates: long documents run in windows)."""
        if len(tasks) != len(texts) or not texts:
            raise ValueError("submit needs one task per text, and at least one text")
        if late:
            chars = sum(map(len, texts)) + len(LATE_SEPARATOR) * (len(texts) - 1)
            if chars > self.max_late_chars:
                raise DocumentTooLong(
                    f"the late-chunking document (the inputs joined) has "
                    f"{chars} characters, over this server's limit of "
                    f"{self.max_late_chars}"
                )
        job = Job(list(texts), list(tasks), dim, normalize, late, truncate, self.adapters)
        with self.cond:
            if self.closing:
                raise Closed("the server is shutting down")
            if self.waiting + len(texts) > self.max_queue:
                raise QueueFull(self.waiting, self.max_queue, self.retry_after(len(texts)))
            self.waiting += len(texts)
            self.inbox.append(job)
            self.cond.notify()
        return job

    def cancel(self, job: Job):
        """Drops the job's texts that have not run yet; its future is cancelled."""
        with self.cond:
            job.cancelled = True
            self.any_cancelled = True
            job.future.cancel()
            self.cond.notify()

    def retry_after(self, incoming: int) -> int:
        """Seconds until `incoming` more texts would fit, at the recent rate (1..60)."""
        excess = self.waiting + incoming - self.max_queue
        if self.rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(excess / self.rate))))

    # --- the worker --------------------------------------------------------------------------

    def _work(self):
        while True:
            work = self._next()
            if work is None:
                return
            if isinstance(work, Job):
                self._run_late(work)
            else:
                self._run(work)

    def _next(self):
        """The next late-chunking job or round of rows; None once closed and empty."""
        while True:
            with self.cond:
                while not (self.inbox or self.rows or self.late or self.closing):
                    self.cond.wait()
                arrived = list(self.inbox)
                self.inbox.clear()
                closing = self.closing
            self._admit(arrived)
            if self.late:
                return self.late.popleft()
            self._drop_cancelled()
            if not self.rows:
                if closing and not self.inbox:
                    return None
                continue
            deadline = self.rows[0].job.arrived + self.max_wait
            full = sum(r.width for r in self.rows) >= self.max_batch_tokens
            if full or closing or time.monotonic() >= deadline:
                return self._take()
            with self.cond:
                if not self.inbox and not self.closing:
                    self.cond.wait(max(0.0, deadline - time.monotonic()))

    def _admit(self, jobs: list[Job]):
        """Tokenizes arrived jobs into rows (late-chunking jobs wait whole)."""
        cfg = self.model.config
        for job in jobs:
            if job.cancelled:  # its client left before the worker saw it
                self.cancelled_total.inc(job.count)
                self._forget(job.count)
                continue
            if job.late:
                self.late.append(job)
                continue
            try:
                ids = self._tokenize(job)
            except Exception as e:  # noqa: BLE001 - the caller gets it; the worker goes on
                self._forget(job.count)
                resolve(job, error=e)
                continue
            if ids is None:  # its client left while it was tokenized
                self.cancelled_total.inc(job.count)
                self._forget(job.count)
                continue
            # The rows hold the ids: the texts (a large request's largest part, up to
            # max_inputs x max_input_chars) go now, not when the request is answered.
            job.texts = None
            job.tokens = sum(len(x) for x in ids)
            job.pooled = np.zeros((len(ids), cfg.hidden_size), np.float32)
            job.remaining = len(ids)
            self.rows.extend(
                Row(job, i, x, bucket_for(len(x), self.limit, LADDER)) for i, x in enumerate(ids)
            )

    def _tokenize(self, job: Job) -> list[np.ndarray] | None:
        """The job's token ids cut at `max_length`, `TOKENIZE_PIECE` texts at a time; None
        once it is cancelled. For a job that may not be truncated, `TooLong` for its first
        longer text (one token more is enough to see it; the message counts that text's tokens
        in full)."""
        limit = self.max_length
        cut = limit if job.truncate else limit + 1
        ids: list = []
        texts = job.held_texts()
        for piece in pieces(texts):
            if job.cancelled:
                return None
            ids += self._token_ids(job, texts[piece], job.tasks[piece], cut)
        if not job.truncate:
            for i, x in enumerate(ids):
                if len(x) > limit:
                    full = self._token_ids(
                        job, texts[i : i + 1], job.tasks[i : i + 1], UNTRUNCATED
                    )[0]
                    raise TooLong(i, len(full), limit)
        return ids

    def _token_ids(self, job: Job, texts, tasks, max_length: int) -> list[np.ndarray]:
        """`token_ids` with the instructions of the job's adapter set, a task at a time."""
        out: list = [None] * len(texts)
        for task in dict.fromkeys(tasks):
            where = [i for i, t in enumerate(tasks) if t == task]
            prompt = job.adapters.instruction(task)
            ids = token_ids(
                self.model.tokenizer,
                self.model.config,
                [texts[i] for i in where],
                [task] * len(where),
                max_length,
                prompt,
            )
            for i, x in zip(where, ids):
                out[i] = x
        return out

    def _forget(self, count: int):
        with self.cond:
            self.waiting -= count

    def _drop_cancelled(self):
        """Removes cancelled jobs' rows (a scan only after a cancel)."""
        with self.cond:
            if not self.any_cancelled:
                return
            self.any_cancelled = False
        kept = collections.deque(r for r in self.rows if not r.job.cancelled)
        if len(kept) != len(self.rows):
            dropped = len(self.rows) - len(kept)
            self.cancelled_total.inc(dropped)
            self._forget(dropped)
            self.rows = kept

    def _take(self) -> list[Row]:
        """Rows first in, first out, up to the token budget (at least one), all submitted
        under one adapter set (the first's: a set replaced meanwhile waits its turn)."""
        taken, cost = [], 0
        adapters = self.rows[0].job.adapters
        while (
            self.rows
            and (not taken or cost + self.rows[0].width <= self.max_batch_tokens)
            and self.rows[0].job.adapters is adapters
        ):
            row = self.rows.popleft()
            taken.append(row)
            cost += row.width
        self._forget(len(taken))
        return taken

    def _run(self, rows: list[Row]):
        started = time.monotonic()
        ids = [r.ids for r in rows]
        tasks = [r.job.tasks[r.index] for r in rows]
        batches = self.runner.plan(ids, tasks)
        if len(self.ready) < self.shape_count:  # warm-up not done (or never run)
            batches = [self.covered(b) for b in batches]
        try:
            pooled = self.runner.submit(ids, tasks, batches, rows[0].job.adapters)
            self.runner.drain()
        except Exception as e:  # noqa: BLE001 - every request of the round gets the error
            self.runner.in_flight.clear()
            for job in {id(r.job): r.job for r in rows}.values():
                resolve(job, error=e)
            return
        for batch in batches:
            self.batches_total.inc()
            self.batch_rows.observe(len(batch.members))
            self.batch_tokens.observe(batch.rows * batch.width)
            assert isinstance(batch.task, tuple)  # a mixed plan: one task per row
            self.round_tasks.observe(len(set(batch.task[: len(batch.members)])))
            self.padded_total.inc(batch.rows * batch.width)
        self.texts_total.inc(len(rows))
        self.tokens_total.inc(sum(len(x) for x in ids))
        for k, row in enumerate(rows):
            job = row.job
            if job.future.done():  # cancelled or failed meanwhile
                continue
            assert job.pooled is not None  # made when its rows were queued
            job.pooled[row.index] = pooled[k]
            job.remaining -= 1
            if job.remaining == 0:
                resolve(job, (finish(job.pooled, job.dim, job.normalize), job.tokens))
        self._note_rate(len(rows), time.monotonic() - started)

    def _run_late(self, job: Job):
        started = time.monotonic()
        self._forget(job.count)
        texts = job.held_texts()  # a late-chunking job is never tokenized row by row
        document, spans, start = LATE_SEPARATOR.join(texts), [], 0
        for text in texts:
            spans.append((start, start + len(text)))
            start += len(text) + len(LATE_SEPARATOR)
        try:
            states = None
            if not job.cancelled:
                # The document's instruction comes from the model's own adapters: one loaded
                # into the server goes onto the model first (here, between forwards).
                job.adapters.carry(self.model, job.tasks[0])
                prepared = prepare_document(
                    self.model, document, job.tasks[0], spans=spans, max_length=self.max_length
                )
                states = self._late_windows(job, prepared.rows)
            if states is None:  # its client left
                self.cancelled_total.inc(job.count)
                return
            # (`prepared` is bound: states is None unless it was made)
            embeddings = finish(prepared.pool(states, 0), job.dim, job.normalize)  # pyright: ignore[reportPossiblyUnboundVariable]
        except Exception as e:  # noqa: BLE001 - the caller gets it; the worker goes on
            resolve(job, error=e)
            return
        # Usage counts the whole document once (windows repeat the instruction).
        tokens = prepared.n_head + len(prepared.first) + 1  # pyright: ignore[reportPossiblyUnboundVariable]
        self.texts_total.inc(job.count)
        self.tokens_total.inc(tokens)
        resolve(job, (embeddings, tokens))
        self._note_rate(job.count, time.monotonic() - started)

    def late_shapes(self) -> list[tuple[int, int]]:
        """The (rows, width) of late chunking's forwards: a document of one window runs alone,
        its width a power of two (or `max_length`'s rung); a longer one's windows (`max_length`
        tokens each) run up to `late_rows` at a time, rows rounded up to a power of two."""
        *short, top = self.late_widths
        multiple = self.model.row_multiple
        rows = sorted({max(multiple, 2**k) for k in range(self.late_rows.bit_length())})
        return [(multiple, w) for w in short] + [(r, top) for r in rows]

    @property
    def late_widths(self) -> tuple[int, ...]:
        """Powers of two below `max_length`'s rung of the ladder, then that rung: few shapes
        (a short document pads at most to twice its length)."""
        top = bucket_for(self.max_length, self.limit, LADDER)
        return tuple(w for w in BUCKETS if w < top) + (top,)

    @property
    def late_rows(self) -> int:
        """Windows per forward in late chunking: a power of two within the batch budget, at
        most `LATE_ROWS` (a cancel is seen between forwards)."""
        fit = max(1, min(LATE_ROWS, self.max_batch_tokens // self.late_widths[-1]))
        return 2 ** (fit.bit_length() - 1)

    def _late_windows(self, job: Job, windows: list[np.ndarray]) -> list[np.ndarray] | None:
        """Each window's token states float32 [n, H], `late_rows` windows a forward; None once
        the job is cancelled (checked between forwards)."""
        pad_id, multiple, out = self.model.config.pad_token_id, self.model.row_multiple, []
        for first in range(0, len(windows), self.late_rows):
            if job.cancelled:
                return None
            group = windows[first : first + self.late_rows]
            rows = max(multiple, 1 << (len(group) - 1).bit_length())
            width = bucket_for(max(map(len, group)), self.limit, self.late_widths)
            ids, lengths = pad(group + [FILLER] * (rows - len(group)), width, pad_id)
            states = np.asarray(
                self.model.hidden(
                    ids, lengths, job.tasks[:1] * rows, merge=False, adapters=job.adapters
                )
            )
            out += [states[k, : len(w)].astype(np.float32) for k, w in enumerate(group)]
            self.batches_total.inc()
            self.padded_total.inc(ids.size)
        return out

    def _note_rate(self, texts: int, seconds: float):
        if seconds > 0:
            rate = texts / seconds
            self.rate = rate if self.rate == 0 else 0.8 * self.rate + 0.2 * rate
