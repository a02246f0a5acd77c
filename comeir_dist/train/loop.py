"""`comeir train`: teacher-forced training (Eq. 12) on 1..N ranks, validation NDCG@10, early stopping,
``best/`` checkpoint, resumable step checkpoints.

One code path for every world size:

* process group: the caller's (torchrun / Ray Train worker / test harness), an ``env://`` one under
  torchrun, or a world-size-1 gloo group created here (``parallel.dist_env``);
* Engram tables: TorchRec DMP, fused exact row-wise Adagrad applied inside backward (never a dense
  optimizer); dense part: one DeepSpeed ZeRO engine (``parallel.dense``); one ``engine.backward(loss)``
  and one ``engine.step()`` per step. The loss is model-defined (``parallel.dense.training_loss``: the SID
  objective of Eq. 12, or the model's own ``training_loss``, e.g. sasrec's cross-entropy over all items).
  A model without Engram tables (flatten / tm / sasrec) has no sparse part: no DMP, no fused optimizer, no
  ``tables/`` in checkpoints (the table helpers find no tables and do nothing);
* data: ``train.batch_size`` is the GLOBAL batch. Every rank draws the same seeded global permutation
  (``EpochSampler``) and takes its contiguous slice of each global batch (``ceil(batch / world)`` samples
  at most). Each rank's loss is ``mean_r * n_r * world / n`` (n_r = its samples, n = the global batch);
  DeepSpeed averages dense gradients over ranks and TorchRec averages the table gradients (gradient
  division in its backward exchange), so both equal the gradient of the global-batch mean: 1 rank and
  N ranks train the same model up to float summation order. A rank without samples (global batch smaller than the
  world) runs one sample with weight 0 -- the lookups are collectives;
* gradient accumulation (``train.grad_accum_steps`` = k): each global batch is split into k micro-batches
  (``micro_slices``), each rank's micro loss weighted ``n_r * world * k / n`` so that, after DeepSpeed's 1/k,
  the accumulated dense gradient is again the gradient of the global-batch mean (also for uneven splits);
  AdamW steps once per global batch. The fused tables update after every micro-batch (their optimizer runs
  inside backward; accumulating them would need unfused kernels), with the same weights;
* validation: every rank evaluates a contiguous slice of the validation users in the same number of
  batches (short slices padded with discarded dummy batches: table lookups are collectives); the
  per-rank ``MetricSums`` are merged exactly;
* checkpoints: ``best/`` (single-process loadable, rank 0 writes full tables) and, with
  ``parallel.checkpoint_every``, ``checkpoints/step-N`` (``train.checkpoint``: resumable on any world size).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from comeir_dist.config.run import RunConfig, resolve_sample_mode
from comeir_dist.errors import UserError
from comeir_dist.eval.evaluate import evaluate_arrays
from comeir_dist.eval.metrics import MetricSums, repeated, with_clustered_se
from comeir_dist.train.schedule import lr_factor, resolve_budget  # noqa: F401  (lr_factor re-exported)
from comeir_dist.parallel.dist_env import (DistEnv, all_gather_object, all_reduce_sum, broadcast_object,
                                            init_distributed)
from comeir_dist.train import checkpoint as ckpt
from comeir_dist.train import early_stop
from comeir_dist.train import train_log
from comeir_dist.train.checkpoint_simple import save_checkpoint
from comeir_dist.train.archive_samples import run_split_samples, run_training_samples
from comeir_dist.train.samples import EpochSampler, row_lengths, split_samples, training_samples  # noqa: F401
from comeir_dist.train.setup import (build_sharded_model, check_memory_plan, dense_parameters, load_inputs,
                                    seed_everything)
from comeir_dist.utils.atomic import write_json
from comeir_dist.utils.output_guard import guard_run_dir

log = logging.getLogger(__name__)


def validation_rows(cfg: RunConfig):
    """(user_idx, history, target) of the validation rows a run evaluates (all, or ``train.eval_users`` of them)."""
    users, hist, target = run_split_samples(cfg, "valid")
    n = cfg.train.eval_users
    if n is not None and n < len(target):
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(target), n, replace=False))
        users, hist, target = users[idx], hist[idx], target[idx]
    return users, hist, target


def validation_subset(cfg: RunConfig):
    _, hist, target = validation_rows(cfg)
    return hist, target


def _epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the tables re-initialised at the start of ``epoch`` (``engram.reinit_every_epoch``)."""
    return (int(seed) * 1_000_003 + int(epoch)) % (1 << 62)


def rank_slice(idx: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """This rank's contiguous part of a global batch and its loss weight ``n_r * world / n`` (see module doc)."""
    mine = np.array_split(idx, world)[rank]
    if len(mine) == 0:
        return idx[:1], 0.0
    return mine, len(mine) * world / len(idx)


def micro_slices(idx: np.ndarray, accum: int, rank: int, world: int) -> list[tuple[np.ndarray, float]]:
    """This rank's part of each of the ``accum`` micro-batches of a global batch, with loss weights
    ``n_r * world * accum / n`` (n = the global batch). An empty micro-batch (global batch smaller than
    ``accum``) runs one sample with weight 0 so every rank still takes part in every collective."""
    out = []
    for micro in np.array_split(idx, accum):
        mine, weight = rank_slice(micro if len(micro) else idx, rank, world)
        out.append((mine, weight * (len(micro) * accum / len(idx))))  # factor exactly 1.0 when accum == 1
    return out


def sharded_validation(model_ctx, hist: np.ndarray, target: np.ndarray, cfg: RunConfig, env: DistEnv,
                       groups: np.ndarray | None = None) -> dict:
    """Item-ranking metrics (beam search for SID models, all items for sasrec; ``eval.evaluate``) over all
    validation users, sharded over ranks and merged exactly. ``groups`` (user of each row) with a user on
    several rows (``prepare --valid-targets``): the standard errors are clustered by user
    (``metrics.clustered_standard_errors``; the per-row values are gathered, a few per user) and ``clusters``
    counts the users."""
    parts = np.array_split(np.arange(len(target)), env.world_size)
    mine = parts[env.rank]
    bs = cfg.eval.batch_size
    n_batches = max(math.ceil(len(p) / bs) for p in parts)  # the same on every rank
    sums = MetricSums()
    clustered = groups is not None and repeated(groups)
    ranked: list[tuple] = []  # (rows, P, G, found, sid_rank) of this rank's batches, for clustered errors
    with model_ctx() as model:
        for b in range(n_batches):
            sel = mine[b * bs:(b + 1) * bs]
            real = len(sel) > 0
            if not real:
                sel = np.arange(min(1, len(target)))  # dummy batch: same collective lookups, result discarded
            res = evaluate_arrays(model, hist[sel], target[sel], beam_size=cfg.eval.beam_size, batch_size=len(sel),
                                  ks=cfg.eval.ks, device=env.device)
            if real:
                sums = sums.merge(res["sums"])
                if clustered:
                    pu = res["per_user"]
                    ranked.append((sel, pu["P"], pu["G"], pu["found"], pu["sid_rank"]))
    merged = MetricSums.merge_all(MetricSums.from_state(s) for s in all_gather_object(sums.state_dict(), env))
    if not clustered:
        return merged.means()
    cols = [np.concatenate(c) for c in zip(*[r for part in all_gather_object(ranked, env) for r in part])]
    return with_clustered_se(merged.means(), np.asarray(groups)[cols[0]], tuple(cols[1:]), cfg.eval.ks)


def _plot_curves(out: Path, title: str) -> None:
    from comeir_dist.train.curves import plot_training_curves

    try:
        plot_training_curves(out, title)
    except Exception as exc:  # noqa: BLE001 -- a figure must never fail a finished run
        log.warning("%s/train_curves.png not written: %s", out, exc)


def train(cfg: RunConfig, on_checkpoint: Optional[Callable[[int, Path, dict], None]] = None,
          resume_from: Optional[Path] = None, overwrite: bool = False) -> Path:
    """Train one model; returns the run dir holding ``best/`` (checkpoint), ``train_log.jsonl``, ``summary.json``
    (and ``checkpoints/step-N`` with ``parallel.checkpoint_every``). Call it on every rank.

    ``on_checkpoint(step, step_dir, metrics)`` runs on every rank after each committed step checkpoint (Ray
    Train reports it). ``resume_from``: a committed step dir to resume from instead of the newest one under
    ``cfg.out`` (a restarted Ray Train worker group resumes from the checkpoint Ray recorded). ``overwrite``:
    accept an out dir holding content comeir did not write (nothing is deleted; see utils.output_guard)."""
    env = init_distributed(cfg.device, cfg.parallel.backend)
    try:
        return _train(cfg, env, on_checkpoint, resume_from, overwrite)
    finally:
        env.shutdown()


def _train(cfg: RunConfig, env: DistEnv, on_checkpoint=None, resume_from: Optional[Path] = None,
           overwrite: bool = False) -> Path:
    cfg = resolve_sample_mode(cfg)  # 'auto' -> this variant's mode, batch and warm-up (recorded in checkpoints)
    tc, pc = cfg.train, cfg.parallel
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if pc.world_size != env.world_size:
        log.warning("parallel.world_size=%d but the process group has %d ranks: using %d", pc.world_size,
                    env.world_size, env.world_size)
    device, world, rank = env.device, env.world_size, env.rank
    out = Path(cfg.out)
    guard_run_dir(cfg, env, overwrite)  # refuses a dir holding other content unless overwrite; writes the marker

    seed_everything(cfg.seed)  # identical dense initialisation on every rank
    sids, emb = load_inputs(cfg)
    plan = check_memory_plan(cfg, world, device.type, num_items=len(emb), item_emb_dim=emb.shape[1])
    if plan is not None and env.is_main:
        log.info(plan.message())
    from comeir_dist.parallel.engram_tables import reinit_tables, set_sparse_lr, sparse_grad_scale

    model = build_sharded_model(cfg, sids, emb, device, plan=pc.sharding, column_shards=pc.column_shards,
                                grad_scale=sparse_grad_scale(world), init_seed=cfg.seed)
    seed_everything(cfg.seed + 7919 * (rank + 1))  # per-rank streams (dropout), independent of the sharding
    model.train()
    hist, target = run_training_samples(cfg)  # archives with model.pref_memory
    cfg = resolve_budget(cfg, len(target))  # max_epochs / eval_every_epochs -> steps
    tc = cfg.train
    val_users, val_hist, val_target = validation_rows(cfg)
    params = dense_parameters(model)
    # state-dict key -> canonical parameter name of the trainable parameters (shared modules, e.g. the Engram
    # read operators used by encoder and head, appear under several keys); everything else never changes
    canonical = {id(p): n for n, p in model.named_parameters()}
    sd_vars = model.state_dict(keep_vars=True)
    aliases = {k: canonical[id(v)] for k, v in sd_vars.items()
               if isinstance(v, torch.nn.Parameter) and v.requires_grad}
    frozen = {k: v.detach().cpu().clone() for k, v in sd_vars.items() if k not in aliases}
    del sd_vars
    per_rank = math.ceil(tc.batch_size / tc.grad_accum_steps / world)  # one micro-batch
    freeze_epochs = cfg.engram.sparse_freeze_epochs
    freeze_step = math.ceil(freeze_epochs * len(target) / tc.batch_size) if freeze_epochs else math.inf

    def sparse_rate(at_step: int) -> float:
        """Table learning rate after ``at_step`` optimizer steps: 0 once frozen, else sparse_lr x plateau scale."""
        if at_step >= freeze_step:
            return 0.0
        # re-initialised tables relearn every epoch from scratch: a cooled rate would leave them undertrained
        return cfg.engram.sparse_lr * (1.0 if cfg.engram.reinit_every_epoch else dense.plateau.scale)

    from comeir_dist.parallel.dense import DenseEngine

    dense = DenseEngine(model, cfg, device, world, per_rank, params)
    lengths = row_lengths(hist) if tc.length_buckets else None
    sampler = EpochSampler(len(target), tc.batch_size, cfg.seed, lengths=lengths, buckets=tc.length_buckets)
    n_dense = sum(p.numel() for p in params)
    # targets per training row: 1 per prefix sample, a window's real positions in sequence mode (throughput log)
    row_targets = (target >= 0).sum(axis=1) if target.ndim == 2 else None

    def batch_tensors(idx: np.ndarray):
        return torch.as_tensor(hist[idx], device=device), torch.as_tensor(target[idx], device=device)

    def zero_step():  # lr = 0 and loss * 0: creates optimizer state without changing anything
        items, tgt = batch_tensors(np.arange(min(per_rank, len(target))))
        for _ in range(dense.accum_steps):  # one optimizer step = accum_steps micro-batches
            dense.backward_step(dense.loss(items, tgt) * 0.0)

    # ---- resume ---------------------------------------------------------------------------------------
    loop = {"best": -1.0, "best_step": 0, "bad": 0, "history": [], "elapsed_s": 0.0, "stop_reason": None}
    step = 0
    latest, problem = None, None
    if env.is_main:  # rank 0 decides (checksums verified, damaged steps skipped), every rank follows
        try:
            latest = ckpt.choose_resume(out, resume_from, pc.resume)
        except UserError as exc:
            problem = str(exc)
    latest, problem = broadcast_object((None if latest is None else str(latest), problem), env)
    if problem:
        raise UserError(problem)
    latest = None if latest is None else Path(latest)
    if latest is not None:
        state = ckpt.read_state(latest)
        ckpt.check_compatible(latest, state, cfg, model, sids.fingerprint, len(target))
        ckpt.load_run_checkpoint(latest, env=env, model=model, dense=dense, zero_step=zero_step)
        step = int(state["step"])
        sampler = EpochSampler(len(target), tc.batch_size, cfg.seed, epoch=state["sampler"]["epoch"],
                               offset=state["sampler"]["offset"], lengths=lengths, buckets=tc.length_buckets)
        loop.update(state["loop"])
        dense.plateau.scale = float(loop.get("lr_scale", 1.0))
        if dense.plateau.scale != 1.0 or step >= freeze_step:
            set_sparse_lr(model, sparse_rate(step))
        if env.is_main:
            log.info("resumed from %s (step %d, saved by %d ranks, now %d)", latest, step, state["world_size"], world)

    log_path = train_log.path_of(out)
    if env.is_main:  # cut back to the resumed step (atomic rewrite; a torn last line is dropped)
        train_log.keep_until(log_path, step if latest is not None else None)
        log.info("%s: %d training samples, %d dense parameters, %d rank(s), device %s, ZeRO %d", cfg.model.variant,
                 len(target), n_dense, world, device, dense.stage)

    def sampler_state() -> dict:
        return {**sampler.state(), "n": len(target), "seed": cfg.seed}

    # steps Ray Train may hand back to a restarted group: the last reported one (or the one resumed from) until the
    # report of a newer one has returned -- registration is asynchronous, so retention must not delete it earlier
    handed_back = [step] if latest is not None else []

    def save_step_checkpoint():
        loop["elapsed_s"] = elapsed()
        loop["log_window"] = {"loss_sum": loss_sum, "loss_n": loss_n, "seen": seen, "seconds": time.time() - t_log}
        d = ckpt.save_run_checkpoint(out, step, env=env, model=model, dense=dense, cfg=cfg,
                                     sampler_state=sampler_state(), loop_state=loop, frozen=frozen,
                                     sid_fingerprint=sids.fingerprint)
        if on_checkpoint is not None:
            last = loop["history"][-1] if loop["history"] else {}
            on_checkpoint(step, d, {"step": step, "best_valid_ndcg@10": loop["best"], "sid_fingerprint":
                                    sids.fingerprint, **{k: v for k, v in last.items() if k.startswith("item/")}})
        if env.is_main:
            ckpt.retain(out, pc.keep_checkpoints, protect=[step, *handed_back[-1:]] if on_checkpoint else [step])
        if on_checkpoint is not None:
            handed_back.append(step)

    def save_best(metrics: dict):
        weights = dense.full_weights()  # fp32 master weights (collective)
        state = {**frozen, **{k: weights[c] for k, c in aliases.items()}}
        save_checkpoint(out / "best", model, cfg, step, metrics, sids.fingerprint, dense=state, write=env.is_main)

    t0 = time.time() - float(loop["elapsed_s"])

    def elapsed() -> float:
        return time.time() - t0

    budget = tc.max_minutes * 60 if tc.max_minutes else float("inf")
    window = loop.get("log_window") or {}  # the running loss window survives a resume (log_every vs checkpoint_every)
    seen, loss_sum, loss_n = int(window.get("seen", 0)), float(window.get("loss_sum", 0.0)), int(window.get("loss_n", 0))
    t_log = time.time() - float(window.get("seconds", 0.0))
    bar = tqdm(total=tc.max_steps, initial=step, desc=f"train {cfg.model.variant}", unit="step", mininterval=2.0,
               disable=not env.is_main)
    stop_reason = loop.get("stop_reason") or "max_steps"
    last_saved = step if latest is not None else -1
    checkpoints = bool(pc.checkpoint_every or pc.checkpoint_at_eval)
    parts: dict[str, float] = {}  # running sums of the model's named loss parts since the last log record
    step_at_log = step
    while step < tc.max_steps and loop.get("stop_reason") is None:
        epoch_before = sampler.epoch
        idx = sampler.next()
        if cfg.engram.reinit_every_epoch and sampler.epoch != epoch_before:
            # MEDA: the dense part goes on, the memories start over (same values on every rank and sharding)
            reinit_tables(model, _epoch_seed(cfg.seed, sampler.epoch), cfg.engram.init_scale)
            if env.is_main:
                log.info("step %d: epoch %d starts with re-initialised Engram tables", step, sampler.epoch)
        local = 0.0
        for mine, weight in micro_slices(idx, tc.grad_accum_steps, rank, world):
            items, tgt = batch_tensors(mine)
            loss = dense.loss(items, tgt)
            dense.backward_step(loss * weight)
            local += float(loss.detach()) * (len(mine) if weight else 0)
        for name, value in (getattr(model, "last_losses", None) or {}).items():  # e.g. Rec2PM's L_AR / L_con
            parts[name] = parts.get(name, 0.0) + value  # this rank's last micro-batch per step, window mean logged
        step += 1
        if step == freeze_step:
            set_sparse_lr(model, 0.0)
            if env.is_main:
                log.info("step %d: Engram tables frozen (engram.sparse_freeze_epochs=%g)", step, freeze_epochs)
        loss_global = all_reduce_sum([local], env)[0] / len(idx)
        seen += len(idx) if row_targets is None else int(row_targets[idx].sum())
        loss_sum, loss_n = loss_sum + loss_global, loss_n + 1
        bar.update(1)
        if step % tc.log_every == 0:
            dt = time.time() - t_log
            rec = {"step": step, "loss": loss_sum / loss_n, "samples_per_s": seen / max(dt, 1e-9), "lr": dense.lr,
                   "elapsed_s": elapsed()}
            if parts:  # unweighted parts of the loss (rank 0; restarts its window on resume)
                rec["loss_parts"] = {k: v / max(step - step_at_log, 1) for k, v in parts.items()}
                parts.clear()
            if env.is_main:
                train_log.append(log_path, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
            seen, loss_sum, loss_n, t_log, step_at_log = 0, 0.0, 0, time.time(), step
        out_of_time = elapsed() > budget
        if tc.max_minutes and world > 1:  # every rank must take the same decision
            out_of_time = all_reduce_sum([float(out_of_time)], env)[0] > 0
        validated = step % tc.eval_every == 0 or step == tc.max_steps or out_of_time
        if validated:
            m = sharded_validation(dense.inference, val_hist, val_target, cfg, env, groups=val_users)
            ndcg = m["item/ndcg@10"]
            loop["history"].append({"step": step, "elapsed_s": elapsed(), **m})
            if env.is_main:
                train_log.append(log_path, {"step": step, "valid": m})
                log.info("step %d valid item/ndcg@10 %.4f hit@10 %.4f (best %.4f)", step, ndcg, m["item/hit@10"],
                         loop["best"])
            decision = early_stop.decide(loop, ndcg, tc.min_delta)
            if dense.plateau.after_validation(decision.improved):  # 'plateau' schedule: cool dense AND sparse rates
                loop["lr_scale"] = dense.plateau.scale
                set_sparse_lr(model, sparse_rate(step))
                if env.is_main:
                    log.info("step %d: no improvement, learning rates scaled to %.3gx", step, dense.plateau.scale)
            if decision.new_best:
                loop.update(best=ndcg, best_step=step, best_elapsed_s=elapsed())
                if tc.save_best:
                    save_best(m)
            loop["bad"] = 0 if decision.improved else loop["bad"] + 1
            loop["stop_reason"] = early_stop.stop_reason(loop, tc.patience, dense.plateau.scale, tc.min_lr_scale)
        if out_of_time and loop.get("stop_reason") is None:
            loop["stop_reason"] = "max_minutes"
        if checkpoints and ((pc.checkpoint_every and step % pc.checkpoint_every == 0) or (pc.checkpoint_at_eval and validated)
                            or loop.get("stop_reason") is not None):
            save_step_checkpoint()
            last_saved = step
    bar.close()
    stop_reason = loop.get("stop_reason") or stop_reason
    if checkpoints and last_saved != step:
        save_step_checkpoint()
    test = None
    if tc.final_test:  # the final (not the best) weights, all test users, merged exactly over ranks
        _, t_hist, t_target = run_split_samples(cfg, "test")
        test = sharded_validation(dense.inference, t_hist, t_target, cfg, env)
        if env.is_main:
            log.info("final model, test split: %s", {k: round(v, 4) for k, v in test.items() if k.startswith("item/")})
    if env.is_main:
        summary = {"variant": cfg.model.variant, "steps": step, "best_step": loop["best_step"],
                   "best_minutes": loop.get("best_elapsed_s", 0.0) / 60, "max_steps": tc.max_steps,
                   "eval_every": tc.eval_every, "train_samples": len(target),
                   "best_valid_ndcg@10": loop["best"], "train_minutes": elapsed() / 60, "stop_reason": stop_reason,
                   "dense_params": n_dense, "world_size": world, "zero_stage": dense.stage,
                   "global_batch": tc.batch_size, "grad_accum_steps": tc.grad_accum_steps, "per_rank_batch": per_rank,
                   "validation": loop["history"]}
        if test is not None:
            summary["test"] = {"step": step, **test}
        write_json(out / "summary.json", summary)
        _plot_curves(out, f"{cfg.model.variant}: {world} rank(s), global batch {tc.batch_size}")
    env.barrier()
    return out
