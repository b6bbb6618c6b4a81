"""pyarrow, the `[data]` extra: imported here once, so a missing install is one clear error for
every module of `jina_jax.data`."""

from __future__ import annotations

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"embedding a corpus into Parquet needs pyarrow: pip install 'jina-jax[data]' ({e})"
    ) from None

__all__ = ["pa", "pq"]
