"""The request and response schema of `jina-jax serve`: the OpenAI embeddings API and the Jina
Embeddings API on one route (`POST /v1/embeddings`, also `/embeddings`), and TEI's
`POST /tokenize`. Pure functions of the parsed JSON; the server (`serve.py`) owns HTTP.

Embedding requests: every field either API defines for a text model, and nothing else (an
unknown field is a 400 naming it, never silently ignored):

    input            str | {"text": str} | [str | {"text": str}, ...]
    model            the served name, optionally "name:task"
    task             a task adapter (release or user adapter), null: the server's default
    dimensions       Matryoshka truncation, 1..hidden
    normalized       bool, default true
    late_chunking    bool, default false (the inputs are the chunks of one document)
    truncate         bool, default true: texts over --max-length tokens are cut there; false:
                     such a text is a 400 naming its index, its token count and the limit
    embedding_type   Jina's: "float" | "base64" | "binary" | "ubinary" | "int8" | "uint8"
    encoding_format  OpenAI's: "float" | "base64" (both given: they must agree)
    user             OpenAI's, accepted and unused

Response encodings (`embedding_type`), each `encode(..., precision=...)` of the same texts:
float: a list of floats; base64: the little-endian float32 bytes, base64 (what the OpenAI
client decodes); binary / ubinary: the sign bits packed eight to a byte (big-endian bit
order), as a list of int8 (byte - 128) / uint8 integers, `ceil(D / 8)` of them, as the Jina
API returns them; int8 / uint8: 256 buckets per dimension over the fixed range [-1, 1]
(`INT8_RANGE`), which holds every component of a normalized embedding, so a vector's code never
depends on the other vectors of its request (the Jina API does not document its calibration;
sentence-transformers calibrates on the batch, which a server cannot do per request). int8 /
uint8 therefore need `normalized: true`.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np

from .encode import quantize
from .tokenize import without_lone_surrogates

EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary", "int8", "uint8")
ENCODING_FORMATS = ("float", "base64")
EMBEDDING_FIELDS = (
    "input",
    "model",
    "task",
    "dimensions",
    "normalized",
    "late_chunking",
    "truncate",
    "embedding_type",
    "encoding_format",
    "user",
)
TOKENIZE_FIELDS = ("inputs", "add_special_tokens", "task", "prompt_name")
# The fixed int8/uint8 calibration: per-dimension [min, max] = [-1, 1] (see the docstring).
INT8_RANGE = (-1.0, 1.0)
TOKEN_ID_HINT = (
    "this server takes text only; LangChain's OpenAIEmbeddings sends token ids of "
    "OpenAI's tokenizer unless it is built with check_embedding_ctx_length=False"
)


class ApiError(Exception):
    """A request the server refuses: HTTP status, and the OpenAI error body's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers=None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self):
        """The OpenAI-style error response (Starlette, the [serve] extra)."""
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    task: str | None
    dim: int
    normalize: bool
    embedding_type: str
    late: bool
    truncate: bool
    model: str


def int8_ranges(dim: int) -> np.ndarray:
    """The fixed calibration of int8/uint8 answers: [2, dim] of [-1, 1]."""
    low, high = INT8_RANGE
    return np.array([[low] * dim, [high] * dim], np.float32)


def check_fields(body, allowed) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise ApiError(
            400,
            f"unknown field {unknown[0]!r}; this route takes {', '.join(allowed)}",
            param=unknown[0],
            code="unknown_field",
        )


def parse_model_name(value, served_name: str) -> str | None:
    """The task a model name carries ("name:task"), or None; ApiError for another model."""
    if not isinstance(value, str):
        raise ApiError(400, f"model must be a string, got {type(value).__name__}", param="model")
    name, _, task = value.partition(":")
    aliases = {served_name, served_name.rsplit("/", 1)[-1]}
    if name not in aliases and name.rsplit("/", 1)[-1] not in aliases:
        raise ApiError(
            404,
            f"the model {value!r} is not served here; this server serves "
            f"{served_name!r} (optionally {served_name!r}:<task>)",
            param="model",
            code="model_not_found",
        )
    return task or None


def _over_limit(status: int, where: str, what: str, limit, code: str) -> ApiError:
    """The error for `where` holding `what` (a count), over this server's `limit`."""
    message = f"{where} has {what}, over this server's limit of {limit}"
    return ApiError(status, message, param=where, code=code)


def texts_of(value, field: str, max_inputs: int, max_chars: int) -> list[str]:
    """The texts of an `input` (strings or Jina's {"text": ...} objects), checked."""
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        raise ApiError(
            400,
            f'{field} must be a string, a {{"text": ...}} object or a list '
            f"of them, got {type(value).__name__}",
            param=field,
        )
    if not items:
        raise ApiError(400, f"{field} is an empty list: send at least one text", param=field)
    if len(items) > max_inputs:
        over = f"{len(items)} texts", f"{max_inputs} per request"
        raise _over_limit(400, field, *over, "too_many_inputs")
    texts = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, dict):
            other = [k for k in item if k != "text"]
            if other:
                raise ApiError(
                    400,
                    f"{where} has the key {other[0]!r}: this server embeds text "
                    'only ({"text": ...})',
                    param=where,
                )
            if "text" not in item:
                raise ApiError(400, f'{where} is an object without "text"', param=where)
            item = item["text"]
        if not isinstance(item, str):
            ids = isinstance(item, int) or (
                isinstance(item, list) and all(isinstance(x, int) for x in item)
            )
            what = "token ids" if ids else type(item).__name__
            raise ApiError(400, f"{where} is {what}, not a string ({TOKEN_ID_HINT})", param=where)
        if not item:
            raise ApiError(400, f"{where} is an empty string", param=where)
        if len(item) > max_chars:
            raise _over_limit(413, where, f"{len(item)} characters", max_chars, "input_too_long")
        texts.append(item)
    return texts


def flag(body, field: str, default: bool) -> bool:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{field} must be true or false, got {value!r}", param=field)
    return default if value is None else value


def resolve(tasks, value, field: str) -> str | None:
    """`tasks.resolve_task(value)` (anything with that method: the model, an adapter set), as
    an ApiError naming `field`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(
            400, f"{field} must be a string or null, got {type(value).__name__}", param=field
        )
    try:
        return tasks.resolve_task(value)
    except ValueError as e:
        raise ApiError(400, str(e), param=field, code="invalid_task") from None


def embedding_type_of(body) -> str:
    """Jina's `embedding_type` and OpenAI's `encoding_format`, reconciled."""
    kind, fmt = body.get("embedding_type"), body.get("encoding_format")
    if kind is not None and kind not in EMBEDDING_TYPES:
        raise ApiError(
            400,
            f"embedding_type must be one of {list(EMBEDDING_TYPES)}, got {kind!r}",
            param="embedding_type",
        )
    if fmt is not None and fmt not in ENCODING_FORMATS:
        raise ApiError(
            400,
            f"encoding_format must be one of {list(ENCODING_FORMATS)} (Jina's "
            f"embedding_type has the packed types), got {fmt!r}",
            param="encoding_format",
        )
    if kind is not None and fmt is not None and kind != fmt:
        raise ApiError(
            400,
            f"encoding_format {fmt!r} and embedding_type {kind!r} disagree: send one of them",
            param="embedding_type",
        )
    return kind or fmt or "float"


def parse_embedding_request(
    body,
    tasks,
    *,
    hidden_size: int,
    default_dim: int | None,
    served_name: str,
    default_task: str | None,
    max_inputs: int,
    max_chars: int,
) -> EmbeddingRequest:
    """The checked request, or ApiError naming the field at fault. `tasks` resolves task names
    (`resolve_task`)."""
    check_fields(body, EMBEDDING_FIELDS)
    if "input" not in body:
        raise ApiError(400, "missing required field: input", param="input")
    texts = texts_of(body["input"], "input", max_inputs, max_chars)
    requested = body.get("model")
    name_task = None if requested is None else parse_model_name(requested, served_name)
    task = resolve(tasks, body.get("task"), "task")
    name_task = resolve(tasks, name_task, "model")
    if task is not None and name_task is not None and task != name_task:
        raise ApiError(
            400,
            f"the model name asks for task {name_task!r}, the task field for {task!r}: give one",
            param="task",
            code="invalid_task",
        )
    task = task or name_task or default_task

    dim = body.get("dimensions")
    if dim is None:
        dim = default_dim or hidden_size
    elif not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= hidden_size:
        raise ApiError(
            400,
            f"dimensions must be an integer in 1..{hidden_size}, got {dim!r}",
            param="dimensions",
        )
    normalize = flag(body, "normalized", True)
    kind = embedding_type_of(body)
    if kind.endswith("int8") and not normalize:
        raise ApiError(
            400,
            f"embedding_type {kind!r} is calibrated on [-1, 1], the range of a "
            "normalized embedding: it needs normalized true",
            param="embedding_type",
        )
    late, truncate = flag(body, "late_chunking", False), flag(body, "truncate", True)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"user must be a string, got {type(user).__name__}", param="user")
    return EmbeddingRequest(
        texts, task, dim, normalize, kind, late, truncate, requested or served_name
    )


def encoded(embeddings: np.ndarray, kind: str) -> list:
    """One JSON value per row of float32 [N, D] embeddings, in `kind` (see the docstring)."""
    if kind == "float":
        return embeddings.astype(np.float32).tolist()
    if kind == "base64":
        return [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
    ranges = int8_ranges(embeddings.shape[1]) if kind.endswith("int8") else None
    return quantize(embeddings, kind, ranges).tolist()


def embedding_body(request: EmbeddingRequest, embeddings: np.ndarray, tokens: int) -> bytes:
    """The response of both APIs, as JSON bytes: {"object": "list", "data": [{"object":
    "embedding", "index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}."""
    data = [
        {"object": "embedding", "index": i, "embedding": v}
        for i, v in enumerate(encoded(embeddings, request.embedding_type))
    ]
    body = {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class TokenizeRequest:
    texts: list[str]
    task: str | None
    add_special_tokens: bool


def parse_tokenize_request(body, tasks, *, max_inputs: int, max_chars: int) -> TokenizeRequest:
    """TEI's /tokenize body ({"inputs", "add_special_tokens"?, "prompt_name"?}) plus "task"
    (prompt_name is its TEI spelling: the prompts of this model are its tasks' instructions)."""
    check_fields(body, TOKENIZE_FIELDS)
    if "inputs" not in body:
        raise ApiError(400, "missing required field: inputs", param="inputs")
    texts = texts_of(body["inputs"], "inputs", max_inputs, max_chars)
    task = resolve(tasks, body.get("task"), "task")
    prompt = resolve(tasks, body.get("prompt_name"), "prompt_name")
    if task is not None and prompt is not None and task != prompt:
        raise ApiError(
            400, f"task {task!r} and prompt_name {prompt!r} disagree: send one", param="prompt_name"
        )
    return TokenizeRequest(texts, task or prompt, flag(body, "add_special_tokens", True))


def tokens_of(tokenizer, text: str, instruction: str, add_special_tokens: bool) -> list[dict]:
    """TEI's token list for `instruction + text`, as `encode` tokenizes it (untruncated):
    {"id", "text", "special", "start", "stop"} per token. start/stop are character offsets into
    `text` (the input as sent); the instruction's tokens have null offsets, as special tokens
    do, and a token that spans the end of the instruction starts at 0."""
    full = without_lone_surrogates(instruction + text)
    enc = tokenizer.encode(full, add_special_tokens=add_special_tokens)
    out, cut = [], len(instruction)
    for token_id, special, (start, stop), piece in zip(
        enc.ids, enc.special_tokens_mask, enc.offsets, enc.tokens
    ):
        if special:
            out.append(
                {"id": token_id, "text": piece, "special": True, "start": None, "stop": None}
            )
            continue
        inside = stop > cut
        out.append(
            {
                "id": token_id,
                "text": full[start:stop],
                "special": False,
                "start": max(start - cut, 0) if inside else None,
                "stop": stop - cut if inside else None,
            }
        )
    return out
