"""Load the semantic IDs of a dataset (DIR/sids/<method>/) with consistency checks."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.data.schema import sids_dir
from comeir_dist.errors import UserError
from comeir_dist.quant.report import codes_fingerprint
from comeir_dist.quant.run import CODEBOOKS_FILE, CODES_FILE, REPORT_FILE


@dataclass
class SidTable:
    """Item -> SID codes and the frozen codebooks e^B of Eq. 2."""

    codes: np.ndarray      # [I, L] int64, codes[i] = SID of item_idx i
    codebooks: np.ndarray  # [L, C, D] float32
    method: str
    fingerprint: str       # sha256 of the int32 codes array (+ report.json "sid_tag"; = its "fingerprint")

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def levels(self) -> int:
        return int(self.codes.shape[1])

    @property
    def codebook_size(self) -> int:
        return int(self.codebooks.shape[1])


def _fail(path: Path, msg: str) -> UserError:
    return UserError(f"{path}: {msg}; re-run `comeir quantize`")


def load_sids(dataset_dir, method: str) -> SidTable:
    """Read codes.parquet, codebooks.npy and report.json of ``method``; one-line UserErrors on problems."""
    dataset_dir = Path(dataset_dir)
    d = sids_dir(dataset_dir, method)
    files = [d / CODES_FILE, d / CODEBOOKS_FILE, d / REPORT_FILE]
    if not all(f.is_file() for f in files):
        raise UserError(f"dataset {dataset_dir} has no SIDs for method {method}: run `comeir quantize` "
                        f"(with quantize.method={method})")
    try:
        report = json.loads(files[2].read_text())
    except ValueError as exc:
        raise _fail(files[2], f"invalid JSON ({exc})") from None
    try:
        table = pq.read_table(files[0])
    except Exception as exc:
        raise _fail(files[0], f"cannot read Parquet ({exc})") from None
    try:
        codebooks = np.load(files[1], allow_pickle=False)
    except Exception as exc:
        raise _fail(files[1], f"cannot read ({exc})") from None
    if codebooks.ndim != 3:
        raise _fail(files[1], f"expected a [L, C, D] array, got shape {codebooks.shape}")
    levels, size = codebooks.shape[:2]

    if table.column_names[:2] != ["item_idx", "codes"] or not pa.types.is_list(
            table.schema.field("codes").type) and not pa.types.is_fixed_size_list(table.schema.field("codes").type):
        raise _fail(files[0], f"expected columns item_idx, codes (list<int32>); got {table.schema}")
    n = table.num_rows
    items_path = dataset_dir / "items.parquet"
    if items_path.is_file():
        n_items = pq.read_metadata(items_path).num_rows
        if n != n_items:
            raise _fail(files[0], f"{n} items but items.parquet has {n_items}")
    idx = table.column("item_idx").to_numpy(zero_copy_only=False)
    if not np.array_equal(idx, np.arange(n)):
        raise _fail(files[0], f"item_idx must be 0..{n - 1} in order")
    col = table.column("codes").combine_chunks()
    lengths = col.value_lengths().to_numpy(zero_copy_only=False) if pa.types.is_list(col.type) else None
    if col.null_count or (lengths is not None and (lengths != levels).any()):
        raise _fail(files[0], f"every item needs exactly {levels} codes (codebooks.npy has L={levels})")
    codes = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).reshape(n, levels)
    if codes.size and (codes.min() < 0 or codes.max() >= size):
        bad = int(np.argwhere((codes < 0) | (codes >= size))[0, 0])
        raise _fail(files[0], f"item_idx {bad} has a code outside 0..{size - 1}: {codes[bad].tolist()}")
    tag = report.get("sid_tag")  # e.g. "assign=argmin"; absent in SID tables written before quantize.assign
    fp = codes_fingerprint(codes, tag if isinstance(tag, str) else None)
    if report.get("fingerprint") not in (None, fp):
        raise _fail(files[2], "fingerprint does not match codes.parquet (files from different runs)")
    return SidTable(codes=codes, codebooks=codebooks.astype(np.float32, copy=False), method=method,
                    fingerprint=fp)
