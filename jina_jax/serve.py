"""`jina-jax serve`: the OpenAI embeddings API and the Jina Embeddings API over one model,
batching every client's requests together (`batcher.Batcher`), on Starlette under uvicorn
(`pip install jina-jax[serve]`).

    POST /v1/embeddings   (also /embeddings) both APIs' fields (`api.py`): "input" (strings or
                          {"text": ...}), "model", "task", "dimensions", "normalized",
                          "late_chunking", "truncate", "embedding_type" (float, base64, binary,
                          ubinary, int8, uint8), "encoding_format", "user"; any other: 400
    POST /tokenize        TEI's: {"inputs", "add_special_tokens", "task" / "prompt_name"}
    GET  /v1/models       the served name, and one "name:task" entry per task (user adapters too)
    POST /v1/adapters     {"name", "path"}: a user adapter into a free slot (--adapter-slots)
    DELETE /v1/adapters/NAME
    GET  /health          200 once the model is loaded and the short shapes compiled (the others
                          compile in the background: "background_warm_up" says how far), else 503
    GET  /metrics         Prometheus text

The adapter: the `task` field, else a task after the model name ("jina-embeddings-v3:
retrieval.query", for clients that cannot send extra fields), else the server's default task
(default: none, as `encode(task=None)`). Tasks are the release's and the user's (`--adapter
NAME=PATH` at start, POST /v1/adapters while serving), all stacked in one fixed layout
(`adapters.AdapterSet`), so any mix runs in one forward and loading an adapter compiles nothing;
a request is answered with the adapter set it arrived under. Every malformed request gets a 4xx
with an OpenAI-style body {"error": {"message", "type", "param", "code"}}; a full queue a 503
with Retry-After; `--api-key` guards /v1/ and /tokenize (401 without `Authorization: Bearer
KEY`). SIGTERM: no new connections, in-flight requests finish, exit 0. A client that leaves has
its texts that have not run dropped.
"""

# The model and the batcher are None until loaded, and every handler calls check_ready() first,
# which a checker cannot follow from one method to another: hence this one rule off here.
# pyright: reportOptionalMemberAccess=false

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tokenizers import Tokenizer

from convert.formats import CheckpointError

from .adapters import AdapterSet, read_adapter
from .api import (
    ApiError,
    EmbeddingRequest,
    check_fields,
    embedding_body,
    parse_embedding_request,
    parse_tokenize_request,
    tokens_of,
)
from .batcher import (
    READY_TOKENS,
    WARM_UP_THREADS,
    Batcher,
    Closed,
    DocumentTooLong,
    Job,
    QueueFull,
    TooLong,
)
from .embedder import JinaEmbeddingsV3
from .http_limits import (
    BodyBudget,
    ClientGone,
    Refused,
    check_json_type,
    parse_json,
    protocol_class,
    read_body,
)
from .metrics import CONTENT_TYPE, Counter, Gauge, Histogram, Registry

log = logging.getLogger("jina_jax.serve")

CLIENT_GONE = 499  # the nginx convention, for metrics only: no one reads the answer
PARSE_INLINE_BYTES = 1 << 20  # larger bodies are parsed off the event loop


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `jina-jax serve` was asked for (its flags, same names)."""

    source: str  # hub id or checkpoint folder
    served_name: str = "jina-embeddings-v3"
    dtype: str = "float32"
    api_key: str | None = None  # None: /v1/ is open
    default_task: str | None = None  # None: no adapter
    # Batching (see batcher.py).
    max_batch_tokens: int = 8192
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 4096
    # Per text and per request.
    max_length: int | None = None  # tokens; None: the model's limit (8192)
    max_input_chars: int = 65536
    max_inputs: int = 2048
    # Hostile input (see http_limits.py): bodies being received or parsed at once, over all
    # requests; a late-chunking document; seconds to send a request's headers, and of silence
    # (keep-alive, or in a body); open connections.
    max_body_bytes_in_flight: int = 512 * 2**20
    max_late_chars: int = 65536
    header_timeout: float = 10.0
    idle_timeout: float = 5.0
    max_connections: int = 1024
    # User adapters: ((name, PATH or PATH@TASK), ...) at start; slots for loading more while
    # serving, every adapter's factors padded to max_adapter_rank (None: the largest at start).
    adapters: tuple = ()
    adapter_slots: int = 0
    max_adapter_rank: int | None = None
    # Warm-up: shapes of at most this many padded positions compile before /health is ready.
    ready_tokens: int = READY_TOKENS
    warm_up_threads: int = WARM_UP_THREADS  # shapes compiled (or loaded) at once

    def __post_init__(self):
        if self.max_inputs > self.max_queue:
            raise ValueError(
                f"max_inputs ({self.max_inputs}) cannot exceed max_queue "
                f"({self.max_queue}): such a request could never be queued"
            )

    @property
    def batching(self) -> dict:
        """The keywords `Batcher` takes from these settings (same names)."""
        names = "max_batch_tokens max_batch_size max_wait_ms max_queue max_length max_late_chars"
        return {name: getattr(self, name) for name in names.split()}

    @property
    def max_body_bytes(self) -> int:
        """A body large enough for `max_inputs` texts of `max_input_chars` (JSON-escaped), but
        no larger than all bodies in flight may be."""
        return min(
            self.max_inputs * (6 * self.max_input_chars + 8) + 65536, self.max_body_bytes_in_flight
        )


class LoadFailed(Exception):
    """The model could not be loaded or warmed; the server stopped."""


def error_response(
    status, message, type="invalid_request_error", param=None, code=None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def parse_request(
    body, tasks, settings: Settings, default_task: str | None, config
) -> EmbeddingRequest:
    """The checked embedding request (`api.parse_embedding_request` with this server's
    settings); `tasks` resolves task names, `config` is the model's."""
    return parse_embedding_request(
        body,
        tasks,
        hidden_size=config.hidden_size,
        default_dim=config.truncate_dim,
        served_name=settings.served_name,
        default_task=default_task,
        max_inputs=settings.max_inputs,
        max_chars=settings.max_input_chars,
    )


class EmbeddingServer:
    """The ASGI app (`app`) and what it serves: the model is loaded and warmed in a thread
    started by the app's lifespan (or given ready-made), while /health says 503."""

    def __init__(self, settings: Settings, model: JinaEmbeddingsV3 | None = None):
        self.settings, self.model = settings, model
        self.batcher: Batcher | None = None
        self.default_task = None
        self.status = "loading"
        self.failure: BaseException | None = None
        # called (from the loader thread) when loading fails
        self.on_failure: Callable[[], object] | None = None
        self.warming, self.warmed = "", False  # background warm-up progress; done
        self.counting_tokenizer = None  # /tokenize's own, untruncated (made on first use)
        self.tokenizer_lock = threading.Lock()
        self.adapters_lock = threading.Lock()  # one adapter change at a time
        self.stopping = threading.Event()
        self.created = int(time.time())
        self.registry = Registry()
        self.body_budget = BodyBudget(settings.max_body_bytes_in_flight)
        self.requests = self.registry.add(
            Counter(
                "jina_jax_requests_total",
                "HTTP requests by route and status code.",
                ("route", "code"),
            )
        )
        self.latency = self.registry.add(
            Histogram(
                "jina_jax_request_seconds",
                "Time from request to answer, by route.",
                [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
                ("route",),
            )
        )
        self.registry.add(
            Gauge(
                "jina_jax_ready",
                "1 once the model is loaded and warmed.",
                lambda: self.status == "ready",
            )
        )
        self.app = Starlette(
            routes=[
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/embeddings", self.embeddings, methods=["POST"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/adapters", self.load_adapter, methods=["POST"]),
                Route("/v1/adapters/{name}", self.remove_adapter, methods=["DELETE"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            # (starlette calls it with the HTTPException it is registered for)
            exception_handlers={HTTPException: self.http_error},  # pyright: ignore[reportArgumentType]
            lifespan=self.lifespan,
        )

    # --- lifecycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loader = threading.Thread(target=self.load, name="jina-jax loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            self.status = "stopping"
            self.stopping.set()
            # Warm-up stops after the shape it is compiling: let it, rather than end the
            # process under a compiler thread (which aborts it).
            await asyncio.to_thread(loader.join, 120)
            if self.batcher is not None:
                await asyncio.to_thread(self.batcher.close)

    def load(self):
        """Loads the model (unless given) and the adapters, builds the batcher, compiles the
        shapes of short requests (`Batcher.ready_shapes`), starts answering, then compiles
        the other shapes in the background (a request that needs one of those first compiles
        it on the way: it waits, never fails)."""
        s = self.settings
        try:
            if self.model is None:
                started = time.monotonic()
                self.model = JinaEmbeddingsV3.from_pretrained(
                    s.source, dtype=s.dtype, adapters=dict(s.adapters)
                )
                log.info(
                    "model loaded from %s in %.1f s", self.model.source, time.monotonic() - started
                )
            else:  # a model given ready-made still gets the adapters asked for
                for name, spec in s.adapters:
                    self.model.attach_adapter(read_adapter(name, spec, self.model.config))
            if s.default_task is not None:
                self.default_task = self.model.resolve_task(s.default_task)
            adapters = AdapterSet.build(self.model, slots=s.adapter_slots, rank=s.max_adapter_rank)
            batcher = Batcher(self.model, registry=self.registry, adapters=adapters, **s.batching)
            self.model.tokenizer  # noqa: B018 - a missing tokenizer fails now, not per request
            shapes = batcher.shapes()
            first = batcher.ready_shapes(s.ready_tokens)
            rest = [x for x in shapes if x not in first]
            log.info(
                "warm-up: %d shapes for --max-length %d (%d tasks stacked, %d adapter "
                "slots, rank %d); %d before answering, %d more in the background, %d at a time",
                len(shapes),
                batcher.max_length,
                len(adapters.names),
                adapters.free_slots,
                adapters.rank,
                len(first),
                len(rest),
                s.warm_up_threads,
            )
            count = self.warm(batcher, first, "warming up", late=False)
            if self.stopping.is_set():
                return
            self.batcher = batcher.start()
            self.status = "ready"
            log.info("ready: %s", count)
            if rest or batcher.late_shapes():  # the late-chunking forwards' shapes too
                log.info("background warm-up: %s", self.warm(batcher, rest, "background"))
            self.warmed = True
        except Exception as e:  # noqa: BLE001 - reported by the command, which exits 1
            self.failure, self.status = e, "failed"
            log.error("loading failed: %s", e)
            if self.on_failure is not None:
                self.on_failure()

    def warm(self, batcher: Batcher, shapes, phase: str, late: bool = True) -> str:
        """Compiles (or loads from the executable store) `shapes` (and, with `late`, the
        late-chunking shapes), logging progress every few seconds; what it did, in words."""
        forward, started = self.model.forward, time.monotonic()
        compiled, loaded = forward.compile_count, forward.loaded_count
        last = [started]

        def progress(done, total):
            self.warming = f"{done}/{total} shapes"
            if phase != "background":
                self.status = f"{phase} ({done}/{total} shapes compiled)"
            now = time.monotonic()
            if now - last[0] >= 5 or done == total:
                last[0] = now
                log.info("%s: %d/%d shapes, %.1f s", phase, done, total, now - started)

        done = batcher.warm_up(
            progress, self.stopping.is_set, shapes, late=late, threads=self.settings.warm_up_threads
        )
        new = forward.compile_count - compiled
        from_store = forward.loaded_count - loaded
        return (
            f"{done} shapes in {time.monotonic() - started:.1f} s ({new - from_store} "
            f"compiled, {from_store} loaded from the store, {done - new} ready already)"
        )

    # --- routes ----------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        return await self.answer(request, "/v1/embeddings", self.embed)

    async def tokenize(self, request: Request) -> Response:
        return await self.answer(request, "/tokenize", self.tokens)

    async def answer(self, request: Request, route: str, handler) -> Response:
        """`handler(request)`'s response, an ApiError's, or a 500; counted under `route`."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except ApiError as e:
            response = e.response()
        except ClientGone:  # it left while sending: nobody reads an answer, nothing failed
            response = Response(status_code=CLIENT_GONE)
        except Exception:  # noqa: BLE001 - a request never takes the server down
            log.error("request failed:\n%s", traceback.format_exc())
            response = error_response(
                500, "internal error while embedding; see the server log", type="server_error"
            )
        self.requests.inc(route=route, code=response.status_code)
        self.latency.observe(time.perf_counter() - started, route=route)
        return response

    async def embed(self, request: Request) -> Response:
        self.authorize(request)
        self.check_ready()
        job, reply = self.submit(await self.read_json(request))
        try:
            outcome = await self.wait(job, request)
        except TooLong as e:
            raise ApiError(400, str(e), param=f"input[{e.index}]", code="input_too_long") from None
        if outcome is None:  # the client left: nobody reads this
            return Response(status_code=CLIENT_GONE)
        embeddings, tokens = outcome
        content = await asyncio.to_thread(embedding_body, reply, embeddings, tokens)
        return Response(content, media_type="application/json")

    def submit(self, body) -> tuple[Job, EmbeddingRequest]:
        """(the queued job, the request's fields for its answer). Neither the parsed body nor
        the answer's fields keep the texts: once the worker has tokenized them nothing holds
        them (up to max_inputs x max_input_chars; the rows hold the ids)."""
        parsed = parse_request(
            body, self.batcher.adapters, self.settings, self.default_task, self.model.config
        )
        try:
            job = self.batcher.submit(
                parsed.texts,
                [parsed.task] * len(parsed.texts),
                parsed.dim,
                parsed.normalize,
                parsed.late,
                parsed.truncate,
            )
        except QueueFull as e:
            raise ApiError(
                503,
                str(e),
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except Closed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        except DocumentTooLong as e:
            raise ApiError(413, str(e), param="input", code="document_too_long") from None
        return job, dataclasses.replace(parsed, texts=[])

    async def tokens(self, request: Request) -> Response:
        """TEI's /tokenize: per input, its tokens as `encode` makes them (untruncated)."""
        self.authorize(request)
        self.check_ready()
        body = await self.read_json(request)
        adapters = self.batcher.adapters
        parsed = parse_tokenize_request(
            body,
            adapters,
            max_inputs=self.settings.max_inputs,
            max_chars=self.settings.max_input_chars,
        )
        instruction = adapters.instruction(parsed.task)

        def run():
            # Its own tokenizer: the batcher's one is set to truncate, and is the worker's.
            with self.tokenizer_lock:
                if self.counting_tokenizer is None:
                    self.counting_tokenizer = Tokenizer.from_str(self.model.tokenizer.to_str())
                    self.counting_tokenizer.no_truncation()
                    self.counting_tokenizer.no_padding()
                tok = self.counting_tokenizer
                return json.dumps(
                    [
                        tokens_of(tok, t, instruction, parsed.add_special_tokens)
                        for t in parsed.texts
                    ],
                    separators=(",", ":"),
                ).encode()

        return Response(await asyncio.to_thread(run), media_type="application/json")

    async def load_adapter(self, request: Request) -> Response:
        return await self.answer(request, "/v1/adapters", self.add_adapter)

    async def remove_adapter(self, request: Request) -> Response:
        return await self.answer(request, "/v1/adapters", self.drop_adapter)

    async def add_adapter(self, request: Request) -> Response:
        """POST /v1/adapters {"name", "path"}: an adapter folder into a free slot (or in the
        place of a loaded one of that name). No compile: the slot layout keeps every shape.
        Requests already queued keep the set they came with."""
        self.authorize(request)
        self.check_ready()
        body = await self.read_json(request)
        check_fields(body, ("name", "path"))
        for field in ("name", "path"):
            if not isinstance(body.get(field), str) or not body[field]:
                raise ApiError(400, f"{field} must be a non-empty string", param=field)
        name, path = body["name"], body["path"]

        def run():
            try:
                adapter = read_adapter(name, path, self.model.config)
            except (CheckpointError, OSError, ValueError) as e:
                message = (
                    f"{e.filename}: {e.strerror}"
                    if isinstance(e, OSError) and e.filename
                    else str(e)
                )
                raise ApiError(
                    400,
                    f"cannot load adapter {name!r}: {message}",
                    param="path",
                    code="invalid_adapter",
                ) from None
            with self.adapters_lock:
                try:
                    new = self.batcher.adapters.with_adapter(adapter)
                except ValueError as e:
                    raise ApiError(409, str(e), param="name", code="adapter_conflict") from None
                self.batcher.adapters = new
            log.info(
                "adapter %r loaded from %s (rank %d); tasks now %s",
                name,
                adapter.source,
                adapter.rank,
                list(new.tasks),
            )
            return {
                "object": "adapter",
                "name": name,
                "source": adapter.source,
                "rank": adapter.rank,
                "tasks": list(new.tasks),
                "free_slots": new.free_slots,
            }

        return JSONResponse(await asyncio.to_thread(run))

    async def drop_adapter(self, request: Request) -> Response:
        """DELETE /v1/adapters/NAME: the slot of an adapter loaded while serving is freed."""
        self.authorize(request)
        self.check_ready()
        name = request.path_params["name"]
        with self.adapters_lock:
            current = self.batcher.adapters
            try:
                current.resolve_task(name)
            except ValueError as e:
                raise ApiError(404, str(e), param="name", code="adapter_not_found") from None
            try:
                new = current.without(name)
            except ValueError as e:
                raise ApiError(409, str(e), param="name", code="adapter_conflict") from None
            self.batcher.adapters = new
        log.info("adapter %r removed; tasks now %s", name, list(new.tasks))
        return JSONResponse(
            {
                "object": "adapter",
                "name": name,
                "deleted": True,
                "tasks": list(new.tasks),
                "free_slots": new.free_slots,
            }
        )

    def check_ready(self):
        if self.status != "ready":
            raise ApiError(
                503,
                f"the model is not ready ({self.status})",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )

    async def wait(self, job, request: Request):
        """The job's (embeddings, tokens), or None when the client disconnects first (the
        job is then cancelled)."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(self.disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not result.done():
            self.batcher.cancel(job)
            return None
        return result.result()

    @staticmethod
    async def disconnected(request: Request):
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def read_json(self, request: Request):
        """The parsed JSON body, within `http_limits`' bounds (ApiError), parsed off the loop."""
        s = self.settings
        try:
            check_json_type(request)
            body, taken = await read_body(
                request, s.max_body_bytes, self.body_budget, s.idle_timeout
            )
            try:
                if len(body) < PARSE_INLINE_BYTES:  # a thread hop costs more than the parse
                    return parse_json(body)
                return await asyncio.to_thread(parse_json, body)
            finally:
                self.body_budget.give(taken)
        except Refused as e:
            raise ApiError(
                e.status,
                e.message,
                code=e.code,
                headers=e.headers,
                type="server_error" if e.status >= 500 else "invalid_request_error",
            ) from None

    def authorize(self, request: Request):
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except ApiError as e:
            self.requests.inc(route="/v1/models", code=e.status)
            return e.response()
        name = self.settings.served_name
        tasks = self.batcher.adapters.tasks if self.batcher is not None else ()
        ids = [name] + [f"{name}:{t}" for t in tasks]
        data = [
            {"id": i, "object": "model", "created": self.created, "owned_by": "jina-jax"}
            for i in ids
        ]
        self.requests.inc(route="/v1/models", code=200)
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        ready = self.status == "ready"
        body = {"status": "ok" if ready else self.status}
        if ready and not self.warmed:
            body["background_warm_up"] = self.warming
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.registry.render(), media_type=CONTENT_TYPE)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        self.requests.inc(route="other", code=exc.status_code)
        return error_response(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            code="not_found" if exc.status_code == 404 else None,
            headers=getattr(exc, "headers", None),
        )


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), so the address is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def run(
    settings: Settings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"
) -> int:
    """Serves until SIGTERM or Ctrl-C; 0 after a clean stop. Prints the address it listens on
    (stderr) before loading the model. OSError if the address cannot be bound, LoadFailed if
    the model could not be loaded."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(max(logging.WARNING, logging.getLogger().level))
    server = EmbeddingServer(settings)
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        server.app,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=60,
        # seconds, for asyncio's call_later: a float works (uvicorn's annotation says int)
        timeout_keep_alive=settings.idle_timeout,  # pyright: ignore[reportArgumentType]
        http=protocol_class(settings.header_timeout, settings.max_connections),
    )
    uv = uvicorn.Server(config)
    server.on_failure = lambda: setattr(uv, "should_exit", True)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"jina-jax serve: listening on http://{shown}:{bound} (model {settings.source!r}, "
        f"GET /health says when it is ready)",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler
    # that was there before: a no-op one, left in place (the raised signal may be handled
    # late), makes that end a clean exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uv.run(sockets=[sock])
    finally:
        sock.close()
    if server.failure is not None:
        raise LoadFailed(f"could not load the model from {settings.source}: {server.failure}")
    return 0
