"""On-disk layout of a prepared dataset directory (explicit pyarrow schemas).

DIR/
  items.parquet       ITEMS_SCHEMA: item_idx (0..I-1), raw_id, title, description, brand, categories
  users.parquet       USERS_SCHEMA: user_idx (0..U-1), raw_id
  sequences.parquet   SEQUENCES_SCHEMA: user_idx, items (full time-ordered item_idx list, after k-core)
  train.parquet       SEQUENCES_SCHEMA: user_idx, items = sequence minus the validation and test targets
  valid.parquet       SPLIT_SCHEMA: user_idx, history (all items before the target), target (the item before the
                      test item; with prepare.valid_targets K, up to K rows per user, oldest first)
  test.parquet        SPLIT_SCHEMA: user_idx, history, target (the last item; with prepare.test_targets K, the
                      last K items, one row each, oldest first)
  stats.json          {"users", "items", "interactions", "k_core", "max_history", "source", ...}
  item_emb.parquet    EMB: item_idx, embedding (fixed_size_list<float32>[d]); meta in item_emb.json
  sids/<method>/      codes.parquet (item_idx, codes list<int32>[L]), codebooks.npy (L, C, D),
                      report.json
"""
from __future__ import annotations

import pyarrow as pa

ITEM_TEXT_FIELDS = ("title", "description", "brand", "categories")

ITEMS_SCHEMA = pa.schema(
    [pa.field("item_idx", pa.int32(), nullable=False), pa.field("raw_id", pa.string(), nullable=False)]
    + [pa.field(f, pa.string()) for f in ITEM_TEXT_FIELDS]
)
USERS_SCHEMA = pa.schema(
    [pa.field("user_idx", pa.int32(), nullable=False), pa.field("raw_id", pa.string(), nullable=False)]
)
SEQUENCES_SCHEMA = pa.schema(
    [pa.field("user_idx", pa.int32(), nullable=False), pa.field("items", pa.list_(pa.int32()), nullable=False)]
)
SPLIT_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("history", pa.list_(pa.int32()), nullable=False),
        pa.field("target", pa.int32(), nullable=False),
    ]
)


def emb_schema(dim: int) -> pa.Schema:
    """Schema of item_emb.parquet for embedding width ``dim``."""
    return pa.schema(
        [
            pa.field("item_idx", pa.int32(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


CODES_SCHEMA_DOC = "item_idx int32, codes list<int32> of length L"


def sids_dir(dataset_dir, method: str):
    """Directory holding the SIDs of ``method`` for a dataset."""
    from pathlib import Path

    return Path(dataset_dir) / "sids" / method
