"""What `jina-jax serve` bounds before a request reaches the model: connections, time to send
headers and body, body size (each body, and all bodies being received or parsed at once), and
the JSON itself (a JSON content type, no duplicate keys, bounded nesting).

Refusals are raised as `Refused` (the server turns them into its JSON error bodies); a client
that leaves while sending is `ClientGone` (no one reads an answer: counted, never logged as an
error). The connection rules live in `protocol_class`, a subclass of uvicorn's own HTTP protocol.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect, Request

from convert.safetensors_io import no_duplicate_keys

if TYPE_CHECKING:  # what `_Deadlines` is mixed into (for checkers; at run time: either protocol)
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Protocol
else:
    _Protocol = object

JSON_TYPES = ("application/json",)


class Refused(Exception):
    """A request refused before parsing: HTTP `status`, a message, an error code."""

    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        # The body was not read: close the connection rather than drain what is still coming.
        self.headers = {"Connection": "close", **(headers or {})}


class ClientGone(Exception):
    """The client disconnected while sending its request."""


class BodyBudget:
    """Bytes of request bodies being received or parsed at once, over all requests (one event
    loop: no lock)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int):
        self.used -= size


def check_json_type(request: Request):
    """415 unless the body is declared JSON (`application/json`, `application/*+json`): a
    browser's form or text/plain POST, which needs no CORS preflight, is never parsed."""
    given = request.headers.get("content-type")
    kind = (given or "").split(";", 1)[0].strip().lower()
    if kind not in JSON_TYPES and not (kind.startswith("application/") and kind.endswith("+json")):
        what = f"Content-Type {given!r}" if given else "no Content-Type"
        raise Refused(
            415,
            f"the body must be JSON, sent as Content-Type: application/json (got {what})",
            "unsupported_media_type",
        )


async def read_body(
    request: Request, max_bytes: int, budget: BodyBudget, idle_timeout: float
) -> tuple[bytearray, int]:
    """(the body, the bytes taken from `budget`: give them back once it is parsed). Refused:
    413 for a declared or streamed size over `max_bytes` (before reading a declared one), 503
    when every body in flight together would pass the budget, 408 after `idle_timeout` seconds
    without a byte. ClientGone if the client leaves."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(
                400, f"Content-Length {declared!r} is not a byte count", "invalid_content_length"
            )
        if int(declared) > max_bytes:
            raise Refused(
                413,
                f"the request body ({declared} bytes) is over this server's "
                f"limit of {max_bytes} bytes",
                "body_too_large",
            )
    taken = int(declared) if declared is not None else 0
    if not budget.take(taken):
        raise Refused(
            503,
            f"request bodies of {budget.used} bytes are being received; this "
            f"server holds at most {budget.limit} at once: retry",
            "busy",
            {"Retry-After": "1"},
        )
    try:
        body = bytearray()
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), idle_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise Refused(408, f"no body byte for {idle_timeout:g} s", "body_timeout") from None
            if len(body) + len(chunk) > max_bytes:  # a chunked body has no declared size
                raise Refused(
                    413,
                    f"the request body is over this server's limit of {max_bytes} bytes",
                    "body_too_large",
                )
            grow = len(body) + len(chunk) - taken
            if grow > 0:
                if not budget.take(grow):
                    raise Refused(
                        503,
                        f"request bodies of {budget.used} bytes are being "
                        f"received; this server holds at most {budget.limit} at "
                        "once: retry",
                        "busy",
                        {"Retry-After": "1"},
                    )
                taken += grow
            body += chunk
    except ClientDisconnect:
        budget.give(taken)
        raise ClientGone() from None
    except BaseException:
        budget.give(taken)
        raise
    return body, taken


def parse_json(body: bytearray):
    """The JSON value of a UTF-8 body. Refused (400) for invalid UTF-8 or JSON, a duplicate key
    in an object (no silent last-one-wins), or nesting deeper than Python's recursion limit.
    The body is emptied as soon as it is decoded (its text is held, not both)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(400, f"the body is not valid JSON: not UTF-8 ({e})", "invalid_json") from None
    del body[:]
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except RecursionError:
        raise Refused(
            400, "the body is not valid JSON here: nested too deeply", "invalid_json"
        ) from None
    except ValueError as e:
        raise Refused(400, f"the body is not valid JSON: {e}", "invalid_json") from None


def _error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def _base_protocol() -> type:
    """The protocol uvicorn's http="auto" picks: httptools where installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


class _Deadlines(_Protocol):
    """Connection rules, mixed into uvicorn's protocol: beyond `max_connections` open ones a new
    connection gets a 503 and is closed at once; a connection must send a request's complete
    headers within `header_timeout` seconds of opening or of its previous answer (slow or
    silent ones get a 408 and are closed)."""

    header_timeout: float
    max_connections: int

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline, self._waiting = None, None
        if len(self.connections) > self.max_connections:
            self._close_with(
                503,
                "Service Unavailable",
                f"this server has {self.max_connections} connections open, its limit: retry",
                "too_many_connections",
            )
            return
        self._arm(self.cycle)

    def _arm(self, previous):
        self._waiting = previous  # headers are complete once a new cycle replaces it
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _check(self):
        if self._deadline is not None and self.cycle is not self._waiting:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data):
        super().data_received(data)
        self._check()

    def on_response_complete(self):
        finished = self.cycle
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(finished)
            self._check()  # a pipelined request may have started already

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _expired(self):
        self._deadline = None
        if not self.transport.is_closing() and self.cycle is self._waiting:
            self._close_with(
                408,
                "Request Timeout",
                f"the request headers did not arrive within {self.header_timeout:g} s",
                "header_timeout",
            )

    def _close_with(self, status, reason, message, code):
        self.transport.write(_error_bytes(status, reason, message, code))
        self.transport.close()


def protocol_class(header_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol with `_Deadlines`' rules (pass as `uvicorn.Config(http=...)`)."""
    base = _base_protocol()
    return type(
        f"Bounded{base.__name__}",
        (_Deadlines, base),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
