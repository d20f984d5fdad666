"""The latents table `stiv prepare` writes and `stiv train` reads: its schema, its one-row meta
table, and the byte codec both sides use.

Latents and text embeddings are stored as raw bytes in a storage dtype plus their shape
(docs/design-notes.md "Lance"): a bucket's rows share one shape, so a batch decodes with one
`frombuffer` per row and stacks without padding. The meta row records the encoders that made
the latents and the encoded empty prompt, always in float32 (docs/recipe.md "Condition
dropout": the null text is the encoded empty string, not zeros).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from model.config import MICRO_COND_NAMES

LATENTS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),  # clips.clip_id, or a hash of the image path
        ("caption", pa.string()),
        ("bucket", pa.string()),  # "f{num_frames}x{height}x{width}" in pixels
        ("num_frames", pa.int32()),  # pixel frames in the sample (1 = image)
        ("height", pa.int32()),  # pixels
        ("width", pa.int32()),  # pixels
        ("latents", pa.binary()),  # storage dtype, C-order, shape latent_shape
        ("latent_shape", pa.list_(pa.int32())),  # (C, T, h, w)
        ("text_tokens", pa.binary()),  # storage dtype, shape text_shape
        ("text_shape", pa.list_(pa.int32())),  # (L, D)
        ("text_mask", pa.binary()),  # uint8 (L,), 1 on real tokens
        ("text_pooled", pa.binary()),  # storage dtype (D,), the EOS token's embedding
        ("micro_cond", pa.list_(pa.float32(), len(MICRO_COND_NAMES))),  # MICRO_COND_NAMES order
    ]
)
# The columns a training batch reads (the rest describe the sample).
BATCH_COLUMNS = ["latents", "latent_shape", "text_tokens", "text_shape", "text_mask",
                 "text_pooled", "micro_cond"]  # fmt: skip


def meta_table_name(latents_table: str) -> str:
    """The one-row table recording encoders and the encoded empty prompt."""
    return f"{latents_table}_meta"


def to_storage(x: Any, dtype: str) -> bytes:
    """An array (numpy or torch, any float dtype) as C-order bytes in the storage dtype."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(dtype)).tobytes()


def mask_bytes(mask: Any) -> bytes:
    """A token mask (True on real tokens) as one uint8 per token."""
    return np.asarray(mask).astype(np.uint8).tobytes()


def decode_rows(table: pa.Table, storage_dtype: str) -> dict[str, np.ndarray]:
    """Rows of one bucket -> stacked float32/bool arrays (shapes equal by construction)."""
    cols = table.to_pydict()
    n = len(cols["latents"])
    lshape = [int(s) for s in cols["latent_shape"][0]]
    tshape = [int(s) for s in cols["text_shape"][0]]

    def stack(name: str, shape: list[int], dtype: str) -> np.ndarray:
        return np.stack([np.frombuffer(b, dtype).reshape(shape) for b in cols[name]]).astype(
            np.float32
        )

    return {
        "latents": stack("latents", lshape, storage_dtype),
        "text_tokens": stack("text_tokens", tshape, storage_dtype),
        "text_pooled": stack("text_pooled", tshape[-1:], storage_dtype),
        "text_mask": np.stack([np.frombuffer(b, np.uint8) for b in cols["text_mask"]]).astype(bool),
        "micro_cond": np.asarray(cols["micro_cond"], dtype=np.float32).reshape(n, -1),
    }


def empty_prompt_fields(tokens: Any, mask: Any, pooled: Any) -> dict[str, bytes]:
    """The meta row's `empty_*` fields from the encoded empty prompt (L, D), (L,), (D,)."""
    return {
        "empty_tokens": to_storage(tokens, "float32"),
        "empty_mask": mask_bytes(mask),
        "empty_pooled": to_storage(pooled, "float32"),
    }


def null_text(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The encoded empty prompt of a meta row: tokens (L, D) float32, mask (L,) bool, pooled
    (D,) float32 (writable copies)."""
    tokens = np.frombuffer(meta["empty_tokens"], np.float32).reshape(-1, int(meta["text_dim"]))
    mask = np.frombuffer(meta["empty_mask"], np.uint8).astype(bool)
    pooled = np.frombuffer(meta["empty_pooled"], np.float32)
    return tokens.copy(), mask, pooled.copy()


def read_meta(db_uri: str, latents_table: str) -> dict[str, Any]:
    """The meta row of `latents_table` in the database at `db_uri`."""
    from data_engine.store import Database

    db = Database(db_uri)
    if not db.has_table(latents_table):
        raise FileNotFoundError(
            f"latents_table: {latents_table!r} not found in {db.uri} (run stiv prepare)"
        )
    return db.table(meta_table_name(latents_table)).to_table().to_pylist()[0]
