"""`jina-jax serve`: the OpenAI embeddings API over one model, batching every client's requests
together (`batcher.Batcher`), on Starlette under uvicorn (`pip install jina-jax[serve]`).

    POST /v1/embeddings   {"input": str | [str], "model", "dimensions", "encoding_format":
                           "float" | "base64", "user"; extensions "task", "late_chunking",
                           "normalized"}
    GET  /v1/models       the served name, and one "name:task" entry per adapter
    GET  /health          200 once the model is loaded and every shape compiled, else 503
    GET  /metrics         Prometheus text

The adapter: the `task` field, else a task after the model name ("jina-embeddings-v3:
retrieval.query", for clients that cannot send extra fields), else the server's default task
(default: none, as `encode(task=None)`). Every malformed request gets a 4xx with an OpenAI-style
body {"error": {"message", "type", "param", "code"}}; a full queue a 503 with Retry-After;
`--api-key` guards /v1/ (401 without `Authorization: Bearer KEY`). SIGTERM: no new connections,
in-flight requests finish, exit 0. A client that leaves has its texts that have not run dropped.
"""

from __future__ import annotations

import asyncio
import base64
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

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batcher import Batcher, Closed, DocumentTooLong, QueueFull
from .embedder import JinaEmbeddingsV3
from .http_limits import (BodyBudget, ClientGone, Refused, check_json_type, parse_json,
                          protocol_class, read_body)
from .metrics import CONTENT_TYPE, Counter, Gauge, Histogram, Registry

log = logging.getLogger("jina_jax.serve")

ENCODING_FORMATS = ("float", "base64")
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
    max_body_bytes_in_flight: int = 512 * 2 ** 20
    max_late_chars: int = 65536
    header_timeout: float = 10.0
    idle_timeout: float = 5.0
    max_connections: int = 1024

    def __post_init__(self):
        if self.max_inputs > self.max_queue:
            raise ValueError(f"max_inputs ({self.max_inputs}) cannot exceed max_queue "
                             f"({self.max_queue}): such a request could never be queued")

    @property
    def max_body_bytes(self) -> int:
        """A body large enough for `max_inputs` texts of `max_input_chars` (JSON-escaped), but
        no larger than all bodies in flight may be."""
        return min(self.max_inputs * (6 * self.max_input_chars + 8) + 65536,
                   self.max_body_bytes_in_flight)


class LoadFailed(Exception):
    """The model could not be loaded or warmed; the server stopped."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code,
                              self.headers)


def error_response(status, message, type="invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    task: str | None
    dim: int
    normalize: bool
    encoding_format: str
    late: bool
    model: str


def parse_model_name(value, served_name: str) -> str | None:
    """The task a model name carries ("name:task"), or None; ApiError for another model."""
    if not isinstance(value, str):
        raise ApiError(400, f"model must be a string, got {type(value).__name__}", param="model")
    name, _, task = value.partition(":")
    aliases = {served_name, served_name.rsplit("/", 1)[-1]}
    if name not in aliases and name.rsplit("/", 1)[-1] not in aliases:
        raise ApiError(404, f"the model {value!r} is not served here; this server serves "
                       f"{served_name!r} (optionally {served_name!r}:<task>)", param="model",
                       code="model_not_found")
    return task or None


def parse_request(body, model: JinaEmbeddingsV3, settings: Settings,
                  default_task: str | None) -> EmbeddingRequest:
    """The checked request, or ApiError naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if "input" not in body:
        raise ApiError(400, "missing required field: input", param="input")
    texts = body["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise ApiError(400, f"input must be a string or a list of strings, got "
                       f"{type(texts).__name__}", param="input")
    if not texts:
        raise ApiError(400, "input is an empty list: send at least one text", param="input")
    if len(texts) > settings.max_inputs:
        raise ApiError(400, f"input has {len(texts)} texts, over this server's limit of "
                       f"{settings.max_inputs} per request", param="input", code="too_many_inputs")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            what = "token ids" if isinstance(text, (int, list)) else type(text).__name__
            raise ApiError(400, f"input[{i}] is {what}, not a string (this server takes "
                           "text only)", param=f"input[{i}]")
        if not text:
            raise ApiError(400, f"input[{i}] is an empty string", param=f"input[{i}]")
        if len(text) > settings.max_input_chars:
            raise ApiError(413, f"input[{i}] has {len(text)} characters, over this server's "
                           f"limit of {settings.max_input_chars}", param=f"input[{i}]",
                           code="input_too_long")

    requested = body.get("model")
    name_task = None if requested is None else parse_model_name(requested, settings.served_name)
    task = body.get("task")
    if task is not None and not isinstance(task, str):
        raise ApiError(400, f"task must be a string or null, got {type(task).__name__}",
                       param="task")
    try:
        task = model.resolve_task(task) if task is not None else None
        name_task = model.resolve_task(name_task) if name_task is not None else None
    except ValueError as e:
        raise ApiError(400, str(e), param="task" if body.get("task") is not None else "model",
                       code="invalid_task") from None
    if task is not None and name_task is not None and task != name_task:
        raise ApiError(400, f"the model name asks for task {name_task!r}, the task field for "
                       f"{task!r}: give one", param="task", code="invalid_task")
    task = task or name_task or default_task

    hidden = model.config.hidden_size
    dim = body.get("dimensions")
    if dim is None:
        dim = model.config.truncate_dim or hidden
    elif not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= hidden:
        raise ApiError(400, f"dimensions must be an integer in 1..{hidden}, got {dim!r}",
                       param="dimensions")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODING_FORMATS:
        raise ApiError(400, f"encoding_format must be one of {list(ENCODING_FORMATS)}, got "
                       f"{encoding!r}", param="encoding_format")
    flags = {}
    for field, default in (("normalized", True), ("late_chunking", False)):
        value = body.get(field)
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, f"{field} must be true or false, got {value!r}", param=field)
        flags[field] = default if value is None else value
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"user must be a string, got {type(user).__name__}", param="user")
    return EmbeddingRequest(texts, task, dim, flags["normalized"], encoding,
                            flags["late_chunking"], requested or settings.served_name)


def embedding_body(request: EmbeddingRequest, embeddings: np.ndarray, tokens: int) -> bytes:
    """The OpenAI response, as JSON bytes. base64: each vector's little-endian float32 bytes."""
    if request.encoding_format == "base64":
        vectors = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                   for row in embeddings]
    else:
        vectors = embeddings.astype(np.float32).tolist()
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return json.dumps(body, separators=(",", ":")).encode()


class EmbeddingServer:
    """The ASGI app (`app`) and what it serves: the model is loaded and warmed in a thread
    started by the app's lifespan (or given ready-made), while /health says 503."""

    def __init__(self, settings: Settings, model: JinaEmbeddingsV3 | None = None):
        self.settings, self.model = settings, model
        self.batcher: Batcher | None = None
        self.default_task = None
        self.status = "loading"
        self.failure: BaseException | None = None
        self.on_failure = None  # called (from the loader thread) when loading fails
        self.stopping = threading.Event()
        self.created = int(time.time())
        self.registry = Registry()
        self.body_budget = BodyBudget(settings.max_body_bytes_in_flight)
        self.requests = self.registry.add(Counter(
            "jina_jax_requests_total", "HTTP requests by route and status code.",
            ("route", "code")))
        self.latency = self.registry.add(Histogram(
            "jina_jax_request_seconds", "Time from request to answer, by route.",
            [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], ("route",)))
        self.registry.add(Gauge("jina_jax_ready", "1 once the model is loaded and warmed.",
                                lambda: self.status == "ready"))
        self.app = Starlette(
            routes=[Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"]),
                    Route("/metrics", self.metrics, methods=["GET"])],
            exception_handlers={HTTPException: self.http_error},
            lifespan=self.lifespan)

    # --- lifecycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        threading.Thread(target=self.load, name="jina-jax loader", daemon=True).start()
        try:
            yield
        finally:
            self.status = "stopping"
            self.stopping.set()
            if self.batcher is not None:
                await asyncio.to_thread(self.batcher.close)

    def load(self):
        """Loads the model (unless given), builds the batcher, compiles every shape."""
        s = self.settings
        try:
            if self.model is None:
                self.model = JinaEmbeddingsV3.from_pretrained(s.source, dtype=s.dtype)
            if s.default_task is not None:
                self.default_task = self.model.resolve_task(s.default_task)
            batcher = Batcher(self.model, max_batch_tokens=s.max_batch_tokens,
                              max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                              max_queue=s.max_queue, max_length=s.max_length,
                              registry=self.registry, max_late_chars=s.max_late_chars)
            self.model.tokenizer  # noqa: B018 - a missing tokenizer fails now, not per request
            started = time.monotonic()

            def progress(done, total):
                self.status = f"warming up ({done}/{total} shapes compiled)"

            count = batcher.warm_up(progress, self.stopping.is_set)
            if self.stopping.is_set():
                return
            self.batcher = batcher.start()
            self.status = "ready"
            log.info("ready: %d shapes compiled in %.1f s", count, time.monotonic() - started)
        except Exception as e:  # noqa: BLE001 - reported by the command, which exits 1
            self.failure, self.status = e, "failed"
            log.error("loading failed: %s", e)
            if self.on_failure is not None:
                self.on_failure()

    # --- routes ----------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        started, route = time.perf_counter(), "/v1/embeddings"
        try:
            response = await self.embed(request)
        except ApiError as e:
            response = e.response()
        except ClientGone:  # it left while sending: nobody reads an answer, nothing failed
            response = Response(status_code=CLIENT_GONE)
        except Exception:  # noqa: BLE001 - a request never takes the server down
            log.error("request failed:\n%s", traceback.format_exc())
            response = error_response(500, "internal error while embedding; see the server "
                                      "log", type="server_error")
        self.requests.inc(route=route, code=response.status_code)
        self.latency.observe(time.perf_counter() - started, route=route)
        return response

    async def embed(self, request: Request) -> Response:
        self.authorize(request)
        if self.status != "ready":
            raise ApiError(503, f"the model is not ready ({self.status})", type="server_error",
                           code="not_ready", headers={"Retry-After": "5"})
        body = await self.read_json(request)
        parsed = parse_request(body, self.model, self.settings, self.default_task)
        try:
            job = self.batcher.submit(parsed.texts, [parsed.task] * len(parsed.texts),
                                      parsed.dim, parsed.normalize, parsed.late)
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except Closed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        except DocumentTooLong as e:
            raise ApiError(413, str(e), param="input", code="document_too_long") from None
        outcome = await self.wait(job, request)
        if outcome is None:  # the client left: nobody reads this
            return Response(status_code=CLIENT_GONE)
        embeddings, tokens = outcome
        content = await asyncio.to_thread(embedding_body, parsed, embeddings, tokens)
        return Response(content, media_type="application/json")

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
            body, taken = await read_body(request, s.max_body_bytes, self.body_budget,
                                          s.idle_timeout)
            try:
                if len(body) < PARSE_INLINE_BYTES:  # a thread hop costs more than the parse
                    return parse_json(body)
                return await asyncio.to_thread(parse_json, body)
            finally:
                self.body_budget.give(taken)
        except Refused as e:
            raise ApiError(e.status, e.message, code=e.code, headers=e.headers,
                           type="server_error" if e.status >= 500 else "invalid_request_error"
                           ) from None

    def authorize(self, request: Request):
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except ApiError as e:
            self.requests.inc(route="/v1/models", code=e.status)
            return e.response()
        name = self.settings.served_name
        tasks = self.model.tasks if self.model is not None else ()
        ids = [name] + [f"{name}:{t}" for t in tasks]
        data = [{"id": i, "object": "model", "created": self.created, "owned_by": "jina-jax"}
                for i in ids]
        self.requests.inc(route="/v1/models", code=200)
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        ready = self.status == "ready"
        return JSONResponse({"status": "ok" if ready else self.status},
                            status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.registry.render(), media_type=CONTENT_TYPE)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        self.requests.inc(route="other", code=exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: "
                              f"{exc.detail}", code="not_found" if exc.status_code == 404
                              else None, headers=getattr(exc, "headers", None))


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), so the address is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8080,
        log_level: str = "info") -> int:
    """Serves until SIGTERM or Ctrl-C; 0 after a clean stop. Prints the address it listens on
    (stderr) before loading the model. OSError if the address cannot be bound, LoadFailed if
    the model could not be loaded."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(max(logging.WARNING, logging.getLogger().level))
    server = EmbeddingServer(settings)
    sock = listening_socket(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(server.app, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=60, timeout_keep_alive=settings.idle_timeout,
                            http=protocol_class(settings.header_timeout,
                                                settings.max_connections))
    uv = uvicorn.Server(config)
    server.on_failure = lambda: setattr(uv, "should_exit", True)
    shown = f"[{host}]" if ":" in host else host
    print(f"jina-jax serve: listening on http://{shown}:{bound} (model {settings.source!r}, "
          f"GET /health says when it is ready)", file=sys.stderr, flush=True)
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
