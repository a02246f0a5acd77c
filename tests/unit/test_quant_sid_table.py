"""load_sids: round trip and one-line errors for missing or inconsistent SIDs."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from comeir_dist.data.schema import ITEMS_SCHEMA, sids_dir
from comeir_dist.errors import UserError
from comeir_dist.quant.report import codes_fingerprint
from comeir_dist.quant.run import write_sids
from comeir_dist.quant.sid_table import SidTable, load_sids


def _items(tmp_path, n):
    t = pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)), "raw_id": [str(i) for i in range(n)],
                  "title": ["t"] * n, "description": [None] * n, "brand": [None] * n, "categories": [None] * n},
                 schema=ITEMS_SCHEMA)
    pq.write_table(t, tmp_path / "items.parquet")


def _sids(tmp_path, codes, C=4, D=3, method="rqkmeans", fingerprint=True):
    d = sids_dir(tmp_path, method)
    d.mkdir(parents=True, exist_ok=True)
    codes = np.asarray(codes)
    report = {"method": method, "fingerprint": codes_fingerprint(codes) if fingerprint else None}
    write_sids(d, codes, np.zeros((codes.shape[1], C, D), np.float32), report)
    return d


def test_round_trip(tmp_path):
    _items(tmp_path, 3)
    codes = np.array([[0, 1], [2, 3], [0, 1]])
    _sids(tmp_path, codes)
    t = load_sids(tmp_path, "rqkmeans")
    assert isinstance(t, SidTable)
    assert t.codes.dtype == np.int64 and np.array_equal(t.codes, codes)
    assert t.codebooks.shape == (2, 4, 3) and t.codebooks.dtype == np.float32
    assert t.method == "rqkmeans" and t.fingerprint == codes_fingerprint(codes)
    assert (t.num_items, t.levels, t.codebook_size) == (3, 2, 4)
    written = pq.read_table(sids_dir(tmp_path, "rqkmeans") / "codes.parquet")
    assert written.schema.field("item_idx").type == pa.int32()
    assert written.schema.field("codes").type == pa.list_(pa.int32())


def test_missing(tmp_path):
    _items(tmp_path, 3)
    with pytest.raises(UserError, match="has no SIDs for method rqvae: run `comeir quantize`"):
        load_sids(tmp_path, "rqvae")


def test_item_count_mismatch(tmp_path):
    _items(tmp_path, 4)
    _sids(tmp_path, np.zeros((3, 2), int))
    with pytest.raises(UserError, match="3 items but items.parquet has 4"):
        load_sids(tmp_path, "rqkmeans")


def test_code_out_of_range(tmp_path):
    _items(tmp_path, 3)
    _sids(tmp_path, np.array([[0, 1], [0, 9], [1, 1]]), C=4)
    with pytest.raises(UserError, match=r"item_idx 1 has a code outside 0..3"):
        load_sids(tmp_path, "rqkmeans")


def test_levels_mismatch_with_codebooks(tmp_path):
    _items(tmp_path, 2)
    d = _sids(tmp_path, np.array([[0, 1], [1, 0]]))
    np.save(d / "codebooks.npy", np.zeros((3, 4, 3), np.float32))
    with pytest.raises(UserError, match="exactly 3 codes"):
        load_sids(tmp_path, "rqkmeans")


def test_fingerprint_mismatch(tmp_path):
    _items(tmp_path, 2)
    d = _sids(tmp_path, np.array([[0, 1], [1, 0]]))
    rep = json.loads((d / "report.json").read_text())
    rep["fingerprint"] = "0" * 64
    (d / "report.json").write_text(json.dumps(rep))
    with pytest.raises(UserError, match="fingerprint does not match"):
        load_sids(tmp_path, "rqkmeans")


def test_corrupt_codes_file(tmp_path):
    _items(tmp_path, 2)
    d = _sids(tmp_path, np.array([[0, 1], [1, 0]]))
    (d / "codes.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read Parquet"):
        load_sids(tmp_path, "rqkmeans")
