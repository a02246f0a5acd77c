"""Tiny synthetic datasets in the prepared layout (items, splits, embeddings, SIDs) for fast tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.config.pipeline import PrepareConfig
from comeir_dist.data.prepare import run_prepare
from comeir_dist.data.schema import emb_schema
from comeir_dist.quant.report import codes_fingerprint
from comeir_dist.quant.run import write_sids

TINY_BACKBONE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
                 "max_positions": 64, "dropout": 0.0}


def make_tiny_dataset(root: Path, n_users=24, n_items=40, seq_len=6, levels=3, codebook_size=8, emb_dim=16,
                      seed=0, method="rqkmeans", valid_targets=1, test_targets=1) -> Path:
    """Users walk a fixed item cycle (learnable transitions); distinct random SIDs; random embeddings."""
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    inter = {str(u): [(u * 3 + j) % n_items for j in range(seq_len)] for u in range(n_users)}
    items = {str(i): {"title": f"item {i}", "description": f"about {i}"} for i in range(n_items)}
    (raw / "Tiny.inter.json").write_text(json.dumps(inter))
    (raw / "Tiny.item.json").write_text(json.dumps(items))
    ds = run_prepare(PrepareConfig(input=str(raw), out=str(root / "ds"), k_core=1, valid_targets=valid_targets,
                                    test_targets=test_targets))
    n = pq.read_metadata(ds / "items.parquet").num_rows
    x = rng.standard_normal((n, emb_dim)).astype(np.float32)
    pq.write_table(pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), emb_dim)},
                            schema=emb_schema(emb_dim)), ds / "item_emb.parquet")
    all_sids = np.stack(np.meshgrid(*[np.arange(codebook_size)] * levels, indexing="ij"), -1).reshape(-1, levels)
    codes = all_sids[rng.choice(len(all_sids), n, replace=False)]
    codebooks = rng.standard_normal((levels, codebook_size, emb_dim)).astype(np.float32)
    out = ds / "sids" / method
    out.mkdir(parents=True)
    write_sids(out, codes, codebooks, {"method": method, "fingerprint": codes_fingerprint(codes)})
    return ds


def tiny_run_config(ds: Path, out: Path, variant="comeir", codebook_size=8, **train):
    from comeir_dist.config.run import RunConfig

    t = {"batch_size": 32, "max_steps": 20, "eval_every": 10, "eval_users": 16, "log_every": 5, "warmup_steps": 2,
         "lr": 3e-3}
    t.update(train)
    return RunConfig.model_validate({
        "dataset": str(ds), "out": str(out), "max_history": 8,
        "engram": {"codebook_size": codebook_size, "s_t": 0.5, "s_s": 0.5, "d_m": 16, "sparse_lr": 0.1},
        "model": {"variant": variant, "token_dim": 8, "window": 3, "backbone": TINY_BACKBONE},
        "train": t, "eval": {"beam_size": 5, "batch_size": 16}})


def assert_decode_matches_teacher_forcing(model, batch, rtol=1e-4, atol=1e-4):
    """Along the target path (one beam), the decoder's level-l logits equal the teacher-forced ones (finite where
    the prefix tree allows the code). Returns the teacher-forced logits."""
    import torch

    codes = model.catalog.item_codes(batch.target)
    with torch.no_grad():
        tf = model.level_logits(batch, codes)
        step = model.decoder(batch)
        parent = None
        for level in range(model.levels):
            out = step(level, codes[:, :level].unsqueeze(1), parent)[:, 0]
            valid = model.trie.valid_mask(codes[:, :level], level=level)
            assert torch.isfinite(out[valid]).all()
            torch.testing.assert_close(out[valid], tf[level][valid], rtol=rtol, atol=atol)
            parent = torch.zeros(codes.shape[0], 1, dtype=torch.long)
    return tf


def dense_trainer(model, batch, lr=1e-2, weight_decay=0.01):
    """``step(n)``: n more dense AdamW steps (one optimizer for every call) on one batch with the constrained SID
    loss (the fused tables update inside backward); returns the last loss."""
    import torch

    from comeir_dist.model.loss import constrained_sid_loss
    from comeir_dist.train.setup import dense_parameters

    opt = torch.optim.AdamW(dense_parameters(model), lr=lr, weight_decay=weight_decay)
    codes = model.catalog.item_codes(batch.target)

    def step(n):
        loss = None
        for _ in range(n):
            loss = constrained_sid_loss(model.level_logits(batch, codes), codes, model.trie)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss
    return step


def train_dense_steps(model, batch, steps=1, lr=1e-2, weight_decay=0.01):
    """Dense AdamW steps on one batch with the constrained SID loss (the fused tables update inside backward);
    returns the last loss."""
    return dense_trainer(model, batch, lr, weight_decay)(steps)


def ranks_every_target_first(model, batch, beam_size=5) -> bool:
    """Beam search (eval mode) ranks every target's SID first; the model's train/eval mode is left as it was."""
    import torch

    from comeir_dist.decode.beam import beam_search

    was_training = model.training
    model.eval()
    codes = model.catalog.item_codes(batch.target)
    with torch.no_grad():
        res = beam_search(model.decoder(batch), model.trie, codes.shape[0], model.levels, beam_size)
    model.train(was_training)
    return torch.equal(res.codes[:, 0], codes)


def assert_overfits(model, batch, steps=150, lr=1e-2, beam_size=5, check_every=10, weight_decay=0.01):
    """At most ``steps`` dense steps on one batch, then beam search ranks every target's SID first. Checked every
    ``check_every`` steps: training stops as soon as it holds (the same check, never more steps)."""
    step = dense_trainer(model, batch, lr, weight_decay)
    done, loss = 0, None
    while done < steps:
        n = min(check_every, steps - done)
        loss, done = step(n), done + n
        if ranks_every_target_first(model, batch, beam_size):
            return done
    raise AssertionError(f"not every target ranked first after {steps} steps, final loss {loss.item():.4f}")


def engram_table_weight(model, name: str):
    """The weight of the Engram table ``name`` of an unsharded ComeIR ``model`` (its EBCs)."""
    for ebc in model.tables.collections().values():
        for t, cfg in zip(ebc.embedding_bags.values(), ebc.embedding_bag_configs()):
            if cfg.name == name:
                return t.weight
    raise KeyError(name)
