"""Embedding stage pieces that need no model: texts, model resolution, fingerprint, loading errors."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from comeir_dist.config.pipeline import EmbedConfig
from comeir_dist.data.schema import ITEMS_SCHEMA, emb_schema
from comeir_dist.errors import UserError
from comeir_dist.quant.embed import (build_texts, input_fingerprint, load_item_embeddings, read_items,
                                     resolve_model, run_embed)


def _items(tmp_path, n=3, order=None):
    idx = list(range(n)) if order is None else order
    t = pa.table({"item_idx": pa.array(idx, pa.int32()), "raw_id": [f"r{i}" for i in idx],
                  "title": [f"Title {i}" for i in idx],
                  "description": ["x" * 50 if i == 0 else None for i in idx],
                  "brand": ["  " if i == 1 else "Acme" for i in idx],
                  "categories": ["A,B"] * n}, schema=ITEMS_SCHEMA)
    pq.write_table(t, tmp_path / "items.parquet")
    return t


def _emb(tmp_path, emb):
    d = emb.shape[1]
    t = pa.Table.from_arrays([pa.array(np.arange(len(emb), dtype=np.int32)),
                              pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1).astype(np.float32)), d)],
                             schema=emb_schema(d))
    pq.write_table(t, tmp_path / "item_emb.parquet")


def test_build_texts_skips_missing_and_cuts(tmp_path):
    t = _items(tmp_path)
    texts = build_texts(t, ["title", "brand", "description"], max_chars=45)
    assert texts[1] == "title: Title 1"               # blank brand and None description skipped
    assert texts[2] == "title: Title 2\nbrand: Acme"
    assert len(texts[0]) == 45 and texts[0].startswith("title: Title 0\nbrand: Acme\ndescription: x")


def test_build_texts_single_field_format(tmp_path):
    t = _items(tmp_path)
    assert build_texts(t, ["title"], 100) == ["title: Title 0", "title: Title 1", "title: Title 2"]


def test_unknown_text_field(tmp_path):
    t = _items(tmp_path)
    with pytest.raises(UserError, match="unknown field 'price'"):
        build_texts(t, ["title", "price"], 100)


def test_read_items_checks_item_idx(tmp_path):
    _items(tmp_path, 3, order=[0, 2, 3])
    with pytest.raises(UserError, match="item_idx must be 0..2"):
        read_items(tmp_path)


def test_resolve_model(tmp_path):
    with pytest.raises(UserError, match="no-such-model"):
        resolve_model("no-such-model")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_run_embed_bad_model_fails_before_ray(tmp_path):
    _items(tmp_path)
    with pytest.raises(UserError, match=r"embed.model = '/nonexistent/model'"):
        run_embed(tmp_path, EmbedConfig(model="/nonexistent/model"))
    assert not (tmp_path / "item_emb.parquet").exists()


def test_run_embed_missing_items(tmp_path):
    with pytest.raises(UserError, match="items.parquet: items file not found"):
        run_embed(tmp_path, EmbedConfig())


def test_fingerprint_depends_on_relevant_fields_only(tmp_path):
    _items(tmp_path)
    p = tmp_path / "items.parquet"
    base = input_fingerprint(p, EmbedConfig())
    assert input_fingerprint(p, EmbedConfig(batch_size=7, num_shards=5)) == base
    assert input_fingerprint(p, EmbedConfig(max_chars=100)) != base
    assert input_fingerprint(p, EmbedConfig(text_fields=["title"])) != base


def test_run_embed_cached_skips_model(tmp_path):
    """A matching fingerprint returns immediately, even for a model that could not be loaded."""
    _items(tmp_path)
    cfg = EmbedConfig(model=str(tmp_path))  # a directory, but not a model: would fail if loaded
    _emb(tmp_path, np.ones((3, 4)))
    (tmp_path / "item_emb.json").write_text(json.dumps(
        {"input_fingerprint": input_fingerprint(tmp_path / "items.parquet", cfg), "items": 3}))
    assert run_embed(tmp_path, cfg) == tmp_path / "item_emb.parquet"


def test_load_item_embeddings(tmp_path):
    _items(tmp_path)
    e = np.arange(12, dtype=np.float32).reshape(3, 4)
    _emb(tmp_path, e)
    out = load_item_embeddings(tmp_path)
    assert out.dtype == np.float32 and np.array_equal(out, e)


def test_load_item_embeddings_errors(tmp_path):
    _items(tmp_path)
    with pytest.raises(UserError, match="run `comeir embed` first"):
        load_item_embeddings(tmp_path)
    _emb(tmp_path, np.zeros((2, 4)))
    with pytest.raises(UserError, match="2 rows but items.parquet has 3"):
        load_item_embeddings(tmp_path)
    (tmp_path / "item_emb.parquet").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read Parquet"):
        load_item_embeddings(tmp_path)
