"""Turning a `src` (local folder or hub id) into a local folder."""

from __future__ import annotations

import os
import re

# What any of the three formats needs; the release repo also carries ONNX files we never read.
ALLOW_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model*.safetensors",
    "model.safetensors.index.json",
    "params.safetensors",
    "adapters.safetensors",
    "heads.safetensors",
    "*/adapter_config.json",
    "*/adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "config_sentence_transformers.json",
]
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def resolve(src: str | os.PathLike, revision: str | None = None) -> str:
    """A local folder as is; otherwise a hub id through `huggingface_hub` (which honours
    `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and the local cache)."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise NotADirectoryError(f"{src}: a checkpoint is a folder, not a file")
    if not _REPO_ID.match(src):
        raise FileNotFoundError(f"{src}: no such folder, and not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return snapshot_download(src, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except (HfHubHTTPError, OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        where = (
            "the local hub cache (HF_HUB_OFFLINE is set)"
            if offline
            else "the hub or the local cache"
        )
        raise FileNotFoundError(
            f"{src}: not a local folder, and not found in {where}: {type(e).__name__}: {e}"
        ) from e
