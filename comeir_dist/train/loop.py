"""`comeir train`: teacher-forced training (Eq. 12) with validation NDCG@10, early stopping, best checkpoint.

Dense parameters: AdamW with linear warm-up and cosine decay, gradient clipping, optional bf16 autocast.
Engram tables: fused exact row-wise Adagrad inside backward (TorchRec DMP), never the dense optimizer.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from comeir_dist.config.run import RunConfig
from comeir_dist.eval.evaluate import evaluate_arrays
from comeir_dist.model.loss import constrained_sid_loss
from comeir_dist.train.checkpoint_simple import save_checkpoint
from comeir_dist.train.samples import EpochSampler, split_samples, to_batch, training_samples
from comeir_dist.train.setup import (build_sharded_model, dense_parameters, load_inputs, resolve_device,
                                     seed_everything)
from comeir_dist.utils.atomic import write_json

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model, batch, optimizer, cfg: RunConfig, device) -> float:
    target_codes = model.catalog.item_codes(batch.target)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
        logits = model.level_logits(batch, target_codes)
    loss = constrained_sid_loss(logits, target_codes, model.trie)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # also applies the fused row-wise Adagrad to the looked-up table rows
    torch.nn.utils.clip_grad_norm_(dense_parameters(model), cfg.train.grad_clip)
    optimizer.step()
    return float(loss.detach())


def validation_subset(cfg: RunConfig):
    _, hist, target = split_samples(cfg.dataset, "valid", cfg.max_history)
    n = cfg.train.eval_users
    if n is not None and n < len(target):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(target), n, replace=False))
        hist, target = hist[idx], target[idx]
    return hist, target


def train(cfg: RunConfig) -> Path:
    """Train one model; returns the run dir holding ``best/`` (checkpoint), ``train_log.jsonl`` and ``summary.json``."""
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, device)
    model.train()
    hist, target = training_samples(cfg.dataset, cfg.max_history)
    val_hist, val_target = validation_subset(cfg)
    params = dense_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps))
    sampler = EpochSampler(len(target), tc.batch_size, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.write_text("")
    n_dense = sum(p.numel() for p in params)
    log.info("%s: %d training samples, %d dense parameters, device %s", cfg.model.variant, len(target), n_dense, device)

    best, best_step, bad, step = -1.0, 0, 0, 0
    t0 = time.time()
    budget = tc.max_minutes * 60 if tc.max_minutes else float("inf")
    seen, loss_sum, loss_n, t_log = 0, 0.0, 0, time.time()
    history = []
    bar = tqdm(total=tc.max_steps, desc=f"train {cfg.model.variant}", unit="step", mininterval=2.0)
    stop_reason = "max_steps"
    while step < tc.max_steps:
        idx = sampler.next()
        batch = to_batch(hist[idx], target[idx], device)
        loss = train_step(model, batch, optimizer, cfg, device)
        sched.step()
        step += 1
        seen += len(idx)
        loss_sum, loss_n = loss_sum + loss, loss_n + 1
        bar.update(1)
        if step % tc.log_every == 0:
            dt = time.time() - t_log
            rec = {"step": step, "loss": loss_sum / loss_n, "samples_per_s": seen / max(dt, 1e-9),
                   "lr": sched.get_last_lr()[0], "elapsed_s": time.time() - t0}
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
            seen, loss_sum, loss_n, t_log = 0, 0.0, 0, time.time()
        out_of_time = time.time() - t0 > budget
        if step % tc.eval_every == 0 or step == tc.max_steps or out_of_time:
            res = evaluate_arrays(model, val_hist, val_target, beam_size=cfg.eval.beam_size,
                                  batch_size=cfg.eval.batch_size, ks=cfg.eval.ks, device=device)
            m = res["sums"].means()
            ndcg = m["item/ndcg@10"]
            history.append({"step": step, "elapsed_s": time.time() - t0, **m})
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, "valid": m}) + "\n")
            log.info("step %d valid item/ndcg@10 %.4f hit@10 %.4f (best %.4f)", step, ndcg, m["item/hit@10"], best)
            if ndcg > best:
                best, best_step, bad = ndcg, step, 0
                save_checkpoint(out / "best", model, cfg, step, m, sids.fingerprint)
            else:
                bad += 1
                if bad >= tc.patience:
                    stop_reason = "early_stopping"
                    break
        if out_of_time:
            stop_reason = "max_minutes"
            break
    bar.close()
    summary = {"variant": cfg.model.variant, "steps": step, "best_step": best_step, "best_valid_ndcg@10": best,
               "train_minutes": (time.time() - t0) / 60, "stop_reason": stop_reason, "dense_params": n_dense,
               "validation": history}
    write_json(out / "summary.json", summary)
    return out
