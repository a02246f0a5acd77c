"""`comeir experiment`: the same data, SIDs, backbone and budget rules for each variant x seed; a results table.

Resumable across invocations and machines: every finished run writes ``OUT/results/<label>-seed<N>.json``
(small, meant to be committed) holding its test metrics, validation curve summary and a hash of the run
config. A rerun with the same config skips it; the table is built from every result file under
``OUT/results``, so a 3-seed table can be assembled over several invocations (``--label`` + ``--set``
add variants with other settings, e.g. ComeIR at another memory size, to the same table).
``popular`` is the most-popular-unseen-items baseline (no training; one deterministic run).

Named arms (``--arms``, :data:`ARMS`): settings defined by a small table of config overrides, each run under its
own label next to the others -- e.g. the rows of DECOR's ablation (paper Table 2). Arms are applied after ``--set``;
with several variants the label is ``<arm>-<variant>``. Runs with DECOR composition also record how many codes
per level receive composition weight above uniform on the validation users (``composition_usage`` in the result
file, and ``<run>/composition_usage.json``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path

from comeir_dist.analysis.paired import POPULAR
from comeir_dist.config.run import RunConfig, resolve_sample_mode
from comeir_dist.errors import UserError
from comeir_dist.utils.atomic import atomic_file, write_json
from comeir_dist.utils.output_guard import claim_out_dir

log = logging.getLogger(__name__)
COLUMNS = ("item/hit@5", "item/ndcg@5", "item/hit@10", "item/ndcg@10", "sid/ndcg@10")

ARM_BOS = "bos"  # in ARMS: the config's model.decor.bos_queries, or DECOR_BOS_QUERIES when it is 0
DECOR_BOS_QUERIES = 32  # DECOR Table 5, Scientific (the bundled data)


def _decor_arm(fusion: str, compose: bool = False, bos: bool = False) -> dict:
    return {"model.token_fusion": fusion, "model.decor.compose": compose,
            "model.decor.bos_queries": ARM_BOS if bos else 0}


# DECOR's ablation (paper Table 2). The paper's "w/ Pretrained Only" is described as "Decomposed Embedding Fusion
# without Contextualized Token Composition", i.e. frozen pretrained + learned collaborative embeddings (fusion
# 'decor'), and Full = that + composition + BOS: the pre* rows use the fusion. 'decor-frozen' is the literal
# reading (the frozen codebook vector alone, projected), 'decor-concat' ComeIR's Eq. 2 for reference.
ARMS: dict[str, dict] = {
    "decor-base": _decor_arm("learned"),  # Base (TIGER): a learned code embedding
    "decor-comp": _decor_arm("learned", compose=True),  # w/ Token Comp.
    "decor-comp-bos": _decor_arm("learned", compose=True, bos=True),  # w/ Token Comp. and BOS Queries
    "decor-pre": _decor_arm("decor"),  # w/ Pretrained Only (fusion, no composition)
    "decor-pre-comp": _decor_arm("decor", compose=True),  # w/ Pretrained + Token Comp.
    "decor-full": _decor_arm("decor", compose=True, bos=True),  # DECOR (Full)
    "decor-frozen": _decor_arm("pretrained"),  # the frozen codebook vector only
    "decor-concat": _decor_arm("concat"),  # ComeIR Eq. 2: W_E [e^B; e^T]
}

# ComeIR settings measured under the fair protocol (issue 11, README "ComeIR vs the paper's baselines"). Each is
# exactly what the README's `--set` / `--ablations` command for that row sets, so a run under the arm has the same
# config hash and reuses (or adds seeds to) the committed result files of that row.
_NO_ENCODER_MEMORY = ["no_e_intra", "no_e_inter"]  # the encoder's Engram reads (Eq. 6, 18-21 into Eq. 7) off
COMEIR_ARMS: dict[str, dict] = {
    "comeir-dot": {"model.head_interaction": "dot"},  # Eq. 10 + a direct h_u-e_x term (extension)
    "comeir-dot-xfit": {"model.head_interaction": "dot", "engram.cross_fit": True},  # + cross-fitted memories
    "comeir-decoder-noeng": {"model.comeir_head": "decoder", "model.ablations": _NO_ENCODER_MEMORY},
    # ComeIR's head (dot extension) reading cross-fitted memories; the encoder reads none (round 20)
    "comeir-dot-xfit-noeng": {"model.head_interaction": "dot", "engram.cross_fit": True,
                              "model.ablations": _NO_ENCODER_MEMORY},
    # the full model (both encoder memories) with the Eq. 7 merge gate starting nearly closed (round 22)
    "comeir-dot-xfit-gate4": {"model.head_interaction": "dot", "engram.cross_fit": True, "model.merge_gate_bias": -4.0},
}
ARMS.update(COMEIR_ARMS)


def _set_dotted(data: dict, dotted: str, value) -> None:
    node = data
    *path, last = dotted.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def arm_overrides(cfg: RunConfig, arm: str) -> dict:
    """The dotted config overrides of ``arm`` (ARM_BOS resolved against ``cfg``)."""
    if arm not in ARMS:
        raise UserError(f"--arms: unknown arm {arm!r}; allowed values: {', '.join(ARMS)}")
    bos = cfg.model.decor.bos_queries or DECOR_BOS_QUERIES
    return {k: (bos if v == ARM_BOS else (list(v) if isinstance(v, list) else v)) for k, v in ARMS[arm].items()}


def arm_variant(arm: str) -> str | None:
    """The only variant ``arm`` applies to (``comeir`` for the ComeIR arms), or None (any)."""
    return "comeir" if arm in COMEIR_ARMS else None


def arm_config(cfg: RunConfig, arm: str) -> RunConfig:
    """``cfg`` with the overrides of ``arm`` applied (validated; a bad combination is one line)."""
    from comeir_dist.config.base import parse_section

    data = cfg.model_dump()
    for key, value in arm_overrides(cfg, arm).items():
        _set_dotted(data, key, value)
    return parse_section(RunConfig, data, source=f"--arms {arm}")


def _check_composition(run_cfg: RunConfig, name: str) -> None:
    m = run_cfg.model
    if m.decor.compose and (m.variant not in ("flatten", "tm") or m.decoding != "normal"):
        raise UserError(f"{name}: model.decor.compose applies to flatten / tm with model.decoding: normal (got "
                        f"{m.variant}, {m.decoding}); run composition arms with --variants flatten or tm")


# parallel.* fields that only say how a run saves and resumes its state
RESUME_FIELDS = ("checkpoint_every", "checkpoint_at_eval", "keep_checkpoints", "resume")


def config_hash(cfg: RunConfig) -> str:
    """Identity of a run's settings (everything but ``out``), so a result file is reused only for its config.
    Values equal to their defaults are left out, so a new config option does not invalidate old result files."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data.pop("out", None)
    parallel = data.get("parallel") or {}
    for bookkeeping in RESUME_FIELDS:  # where and how often a run saves its state does not change its result
        parallel.pop(bookkeeping, None)
    if not parallel:
        data.pop("parallel", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _size(r: dict) -> str:
    e = r.get("engram") or {}
    return f"s_S {e['s_s']:g}, s_T {e['s_t']:g}, d_m {e['d_m']}" if r["variant"] == "comeir" and e else "-"


def format_table(rows: list[dict], averaged: dict[str, dict] | None = None) -> str:
    """Markdown: one line per label, test metrics mean ± std over seeds, validation at the best step (± its
    standard error over users), the test NDCG@10's standard error over users (clustered by user when users have
    several rows; the mean over seeds), best step / epoch, minutes to the best validation, memory size; with a
    ``popular`` row, every label's mean test NDCG@10 as a multiple of the most-popular baseline's (the margin a
    first run on new data must show) and the paired difference to it. ``averaged`` (label -> paired difference
    of the label's seeds averaged per row, :func:`seed_averaged_vs_popular`) replaces the mean over seeds there."""
    present = set.intersection(*(set(r["metrics"]) for r in rows)) if rows else set()
    columns = [c for c in COLUMNS if c in present]  # eval.ks decides which @K exist (10 always does)
    se_head = " | test ndcg@10 s.e." if "se/item/ndcg@10" in present else ""  # over users (clustered), seeds' mean
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    popular = (statistics.fmean(r["metrics"]["item/ndcg@10"] for r in by_label[POPULAR])
               if POPULAR in by_label else None)
    ratio_head = " | ndcg@10 / popular | ndcg@10 - popular (paired s.e.)" if popular else ""
    head = ("| variant | memory | seeds | " + " | ".join(f"test {c}" for c in columns) + se_head + ratio_head
            + " | valid ndcg@10 (± s.e.) | best step (epoch) | min to best | eval ms/user |")
    lines = [head, "|" + "---|" * (len(columns) + 7 + bool(se_head) + 2 * bool(popular))]
    order = sorted(by_label, key=lambda k: -statistics.fmean(r["metrics"]["item/ndcg@10"] for r in by_label[k]))
    for label in order:
        rs = by_label[label]
        cells = []
        for c in columns:
            m, s = _mean_std([r["metrics"][c] for r in rs])
            cells.append(f"{m:.4f} ± {s:.4f}" if len(rs) > 1 else f"{m:.4f}")
        v, _ = _mean_std([r["valid_best"] for r in rs])
        se, _ = _mean_std([r["valid_best_se"] for r in rs])
        bs, _ = _mean_std([r["best_step"] for r in rs])
        be, _ = _mean_std([r["best_epoch"] for r in rs])
        bm, _ = _mean_std([r["best_minutes"] for r in rs])
        ms, _ = _mean_std([r["ms_per_user"] for r in rs])
        if se_head:
            cells.append(f"{statistics.fmean(r['metrics']['se/item/ndcg@10'] for r in rs):.4f}")
        if popular:
            cells.append(f"{statistics.fmean(r['metrics']['item/ndcg@10'] for r in rs) / popular:.2f}x")
            cells.append(_paired_cell(rs, (averaged or {}).get(label)))
        lines.append(f"| {label} | {_size(rs[0])} | {len(rs)} | " + " | ".join(cells)
                     + f" | {v:.4f} ± {se:.4f} | {bs:.0f} ({be:.2f}) | {bm:.1f} | {ms:.2f} |")
    return "\n".join(lines)


def _paired_cell(rs: list[dict], averaged: dict | None = None) -> str:
    """The paired difference to popular (s.e. clustered by user when users have several rows). With several seeds:
    the difference of the seeds averaged per row (``averaged``; seed-to-seed noise averaged out, the s.e. over the
    test users) when every seed's per-user results were at hand, else the mean over seeds of the difference and
    of its s.e. (each seed's users are the same test users, so the s.e. is not divided again); then each seed's z.
    '-' for rows without per-user results."""
    paired = [r["vs_popular"] for r in rs if r.get("vs_popular")]
    if not paired:
        return "-"
    if len(rs) == 1:
        return _difference(paired[0]["diff"], paired[0]["se"])
    per_seed = " / ".join(f"{p['z']:.1f}" for p in paired)
    if averaged:
        return f"{_difference(averaged['diff'], averaged['se'])} (seeds averaged per row; z per seed {per_seed})"
    diff = statistics.fmean(p["diff"] for p in paired)
    se = statistics.fmean(p["se"] for p in paired)
    part = f" of {len(rs)}" if len(paired) < len(rs) else ""
    return f"{_difference(diff, se)} (mean over {len(paired)}{part} seeds; z per seed {per_seed})"


def _difference(diff: float, se: float) -> str:
    return f"{diff:+.4f} ± {se:.4f}" + (f", {diff / se:.1f} s.e." if se > 0 else "")


def seed_averaged_vs_popular(dataset: str, root: Path, rows: list[dict]) -> dict[str, dict]:
    """label -> paired difference to popular of the label's seeds averaged per row, for every label with several
    seeds whose run dirs under ``root`` all still hold the per-user test results the result files report (a table
    rebuilt from committed result files alone falls back to the mean over seeds)."""
    from comeir_dist.analysis.pairwise import experiment_variants, popular_variant, versus

    seeds = {label: sum(r["label"] == label for r in rows) for label in {r["label"] for r in rows}}
    if POPULAR not in seeds or not any(n > 1 for label, n in seeds.items() if label != POPULAR):
        return {}  # no popular column, or nothing to average
    try:
        popular = popular_variant(dataset)
        return {v.label: versus(v, popular) for v in experiment_variants(root)
                if 1 < len(v.seeds) == seeds[v.label]}
    except UserError as exc:  # e.g. runs of another split: the table keeps the per-seed mean
        log.warning("%s: no seed-averaged difference to popular (%s)", root, exc)
        return {}


def _run_config(cfg: RunConfig, variant: str, seed: int, run_dir: Path) -> RunConfig:
    """The config of one run; the variant-specific checks (flatten positions, sasrec-only sample mode) fail as
    one line naming the variant."""
    from comeir_dist.config.base import parse_section

    data = cfg.model_dump()
    data["model"]["variant"], data["seed"], data["out"] = variant, seed, str(run_dir)
    if data["parallel"].get("checkpoint_at_eval") is None:  # a rerun continues an interrupted run
        data["parallel"]["checkpoint_at_eval"] = True
    return parse_section(RunConfig, data, source=f"--variants {variant} (config {cfg.out})")


# best/ tables above this size are tested in a fresh process: the training process still holds the trained model
# (DeepSpeed's hooks keep it in reference cycles) and a second copy of an s_T = 8 table set (12 GB) does not fit
CHILD_EVAL_TABLE_BYTES = 1 << 30


def table_bytes(run_cfg: RunConfig) -> int:
    """Bytes of the run's Engram tables (0 for variants without them)."""
    from comeir_dist.engram.sizing import table_specs

    if run_cfg.model.variant != "comeir":
        return 0
    width = 2 if run_cfg.engram.table_dtype == "fp16" else 4
    return width * sum(s.params for s in table_specs(run_cfg.engram))


def _train_run(run_cfg: RunConfig, overwrite: bool) -> None:
    """``train`` in this process, or in a fresh one when the tables are large: the process that trained keeps the
    model (DeepSpeed's hooks hold it in reference cycles), and the test evaluation that follows would need a second
    copy next to it (an s_T = 8 run was OOM-killed on 24 GiB that way). A child's memory is returned when it exits."""
    from comeir_dist.train.loop import train

    size = table_bytes(run_cfg)
    if size <= CHILD_EVAL_TABLE_BYTES:
        train(run_cfg, overwrite=overwrite)
        return
    log.info("%s: %.1f GB of tables, training in a fresh process", run_cfg.out, size / 1e9)
    _in_fresh_process(_train_child, (run_cfg.model_dump(mode="json"), overwrite),
                      f"{run_cfg.out}: the training process failed", "continue from its last validation")


def _train_child(data: dict, overwrite: bool) -> None:
    from comeir_dist.config.base import parse_section
    from comeir_dist.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_section(RunConfig, data, source="comeir experiment (training process)"), overwrite=overwrite)


def _trained_earlier(run_cfg: RunConfig, run_dir: Path) -> bool:
    """A finished training of this very config (summary.json with a stop reason, a committed best/ whose config
    hashes equal): a rerun after the test evaluation was interrupted only evaluates."""
    from comeir_dist.config.base import parse_section
    from comeir_dist.train.checkpoint_simple import COMMIT
    from comeir_dist.train.schedule import resolve_budget

    summary, meta = run_dir / "summary.json", run_dir / "best" / "meta.json"
    if not (summary.is_file() and meta.is_file() and (run_dir / "best" / COMMIT).is_file()):
        return False
    try:
        info = json.loads(summary.read_text())
        saved = parse_section(RunConfig, json.loads(meta.read_text())["config"])
        # best/ holds the config as trained: sample mode 'auto' and epoch budgets resolved (over its samples)
        resolved = resolve_budget(resolve_sample_mode(run_cfg), int(info["train_samples"]))
    except (ValueError, KeyError, TypeError, UserError):
        return False
    return info.get("stop_reason") is not None and config_hash(saved) == config_hash(resolved)


def _tested_earlier(best: Path, out: Path) -> dict | None:
    """``out`` (test.json) when it was written after best/ was committed, for best/'s step: the test evaluation
    finished although the process that started it did not (a rerun then only collects it)."""
    from comeir_dist.train.checkpoint_simple import COMMIT

    try:
        res, meta = json.loads(out.read_text()), json.loads((best / "meta.json").read_text())
        fresh = out.stat().st_mtime >= (best / COMMIT).stat().st_mtime
    except (OSError, ValueError):
        return None
    ok = fresh and isinstance(res, dict) and res.get("split") == "test" and res.get("step") == meta.get("step")
    return res if ok and isinstance(res.get("metrics"), dict) else None


def _evaluate_test(best: Path, out: Path) -> dict:
    from comeir_dist.eval.run_eval import run_evaluate

    earlier = _tested_earlier(best, out)
    if earlier is not None:
        log.info("%s: tested earlier (%s)", best, out)
        return earlier
    tables = best / "tables.pt"
    if not (tables.is_file() and tables.stat().st_size > CHILD_EVAL_TABLE_BYTES):
        return run_evaluate(str(best), "test", str(out))
    log.info("%s: %.1f GB of tables, testing in a fresh process", best, tables.stat().st_size / 1e9)
    _in_fresh_process(run_evaluate, (str(best), "test", str(out)),
                      f"{best}: the test evaluation process failed", "evaluate again without retraining")
    return json.loads(out.read_text())


def _in_fresh_process(target, args: tuple, failed: str, rerun: str) -> None:
    """``target(*args)`` in a spawned process (its memory is returned when it exits); a failure is one UserError."""
    import multiprocessing as mp

    child = mp.get_context("spawn").Process(target=target, args=args)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise UserError(f"{failed} (exit code {child.exitcode}); rerun the same command to {rerun}")


def _train_and_test(run_cfg: RunConfig, run_dir: Path, overwrite: bool = False) -> dict:
    if not overwrite and _trained_earlier(run_cfg, run_dir):
        log.info("%s: trained earlier (summary.json, best/), evaluating best/ on the test split", run_dir)
    else:
        _train_run(run_cfg, overwrite)
    summary = json.loads((run_dir / "summary.json").read_text())
    if not (run_dir / "best").is_dir():
        raise UserError(f"{run_dir}: training wrote no best/ checkpoint (train.save_best is off?)")
    res = _evaluate_test(run_dir / "best", run_dir / "test.json")
    paired = _vs_popular(run_cfg, run_dir)
    best = [v for v in summary["validation"] if v["step"] == summary["best_step"]]
    best = best[0] if best else {}
    batch = resolve_sample_mode(run_cfg).train.batch_size  # in windows when 'auto' trains on every position
    return {"metrics": res["metrics"], "ms_per_user": res["ms_per_user"], "steps": summary["steps"],
            "best_step": summary["best_step"], "best_minutes": summary.get("best_minutes", 0.0),
            "best_epoch": summary["best_step"] * batch / max(1, summary.get("train_samples", 1)),
            "train_minutes": summary["train_minutes"], "stop_reason": summary["stop_reason"],
            "train_samples": summary.get("train_samples"), "valid_best": summary["best_valid_ndcg@10"],
            "valid_best_se": best.get("se/item/ndcg@10", 0.0),
            "validation": [{"step": v["step"], "item/ndcg@10": v["item/ndcg@10"]} for v in summary["validation"]],
            **({"vs_popular": paired} if paired else {})}


def _vs_popular(run_cfg: RunConfig, run_dir: Path) -> dict | None:
    """Test NDCG@10 minus the most-popular baseline's, paired over users (analysis.paired), from the run's
    ``test.users.parquet``; None without that file."""
    from comeir_dist.analysis.paired import vs_popular

    users = run_dir / "test.users.parquet"
    return vs_popular(run_cfg.dataset, users) if users.is_file() else None


def _tested_as(run_dir: Path, row: dict) -> bool:
    """Whether ``run_dir``'s test.json / test.users.parquet are the evaluation a result file reports (results
    written before the paired comparison existed get it on a rerun)."""
    try:
        test = json.loads((run_dir / "test.json").read_text())
    except (OSError, ValueError):
        return False
    return ((run_dir / "test.users.parquet").is_file() and isinstance(test, dict)
            and test.get("metrics", {}).get("item/ndcg@10") == row["metrics"].get("item/ndcg@10"))


def _popular(run_cfg: RunConfig) -> dict:
    from comeir_dist.eval.popular import popular_metrics

    test = popular_metrics(run_cfg, "test")
    valid = popular_metrics(run_cfg, "valid")
    return {"metrics": test, "ms_per_user": 0.0, "steps": 0, "best_step": 0, "best_minutes": 0.0, "best_epoch": 0.0,
            "train_minutes": 0.0, "stop_reason": "no training", "valid_best": valid["item/ndcg@10"],
            "valid_best_se": valid.get("se/item/ndcg@10", 0.0), "validation": []}


def protocol_deviations(cfg: RunConfig) -> list[str]:
    """Settings under which variants are not compared at their best (the README's fair protocol)."""
    tc, out = cfg.train, []
    if tc.lr_schedule == "cosine" and tc.max_epochs is None:
        out.append("train.lr_schedule: cosine decays over a guessed max_steps (use plateau or constant)")
    if tc.eval_users is not None:
        out.append(f"train.eval_users: {tc.eval_users} (validation on a subset; null = all users)")
    if tc.max_minutes is not None:
        out.append(f"train.max_minutes: {tc.max_minutes} (a wall-clock budget favours fast variants)")
    return out


def load_results(root: Path) -> list[dict]:
    from comeir_dist.analysis.pairwise import read_result_files

    return read_result_files(sorted((root / "results").glob("*.json")))


def _settings(cfg: RunConfig, variants: list[str], label: str | None, arms: list[str] | None) -> list[tuple]:
    """(label, variant, base config, arm or None) of every table row; arms x variants when ``arms``."""
    if not arms:
        return [(label or v, v, cfg, None) for v in variants]
    if label:
        raise UserError(f"--label {label!r} and --arms: every arm is its own label")
    out = [(POPULAR, POPULAR, cfg, None)] if POPULAR in variants else []
    trained = [v for v in variants if v != POPULAR]
    for arm in dict.fromkeys(arms):
        acfg = arm_config(cfg, arm)
        only = arm_variant(arm)
        if only is not None and any(v != only for v in trained):
            raise UserError(f"--arms {arm}: a {only} setting; run it with --variants {only} (got "
                            f"{','.join(trained)})")
        out += [(arm if len(trained) == 1 else f"{arm}-{v}", v, acfg, arm) for v in trained]
    return out


def _composition_usage(run_cfg: RunConfig, run_dir: Path) -> dict:
    """Composition weights above uniform per level (decor.composition_usage) of ``run_dir/best`` on the run's
    validation users; also written to ``run_dir/composition_usage.json``."""
    import torch.distributed as dist

    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.model.decor import composition_usage
    from comeir_dist.train.loop import validation_subset

    created = not dist.is_initialized()
    try:
        model, _, _, _ = load_model_from_checkpoint(run_dir / "best")
        hist, target = validation_subset(run_cfg)
        usage = composition_usage(model, hist, target, batch_size=run_cfg.eval.batch_size)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    write_json(run_dir / "composition_usage.json", usage)
    return usage


def run_experiment(cfg: RunConfig, variants: list[str], seeds: int, label: str | None = None,
                   overwrite: bool = False, arms: list[str] | None = None) -> str:
    """Train/evaluate every (variant, seed) -- with ``arms``: every (arm, variant, seed) -- under ``cfg.out``;
    finished runs (result files) are reused."""
    if label and len(variants) > 1:
        raise UserError(f"--label {label!r} names one variant, got --variants {','.join(variants)}")
    settings = _settings(cfg, variants, label, arms)
    for name, variant, base, _ in settings:  # every combination is checked before anything trains
        if variant != POPULAR:
            _check_composition(_run_config(base, variant, base.seed, Path(base.out) / name), name)
    root = Path(cfg.out)
    for problem in protocol_deviations(cfg):
        log.warning("not the fair protocol: %s (see configs/experiment_cpu.yaml)", problem)
    # a dir holding other content (or another kind of output) is refused unless overwrite; nothing is deleted
    claim_out_dir(root, "experiment", None, "comeir experiment", overwrite=overwrite)
    (root / "results").mkdir(parents=True, exist_ok=True)
    for seed in range(cfg.seed, cfg.seed + seeds):
        for name, variant, base, arm in settings:
            if variant == POPULAR and seed != cfg.seed:
                continue  # deterministic: one run
            key = f"{name}-seed{seed}"
            run_dir = root / key
            # popular reads only the dataset and eval settings: the base config's own variant keeps it valid
            run_cfg = _run_config(base, base.model.variant if variant == POPULAR else variant, seed, run_dir)
            h = config_hash(run_cfg)
            result_path = root / "results" / f"{key}.json"
            if result_path.is_file():
                old = json.loads(result_path.read_text())
                if old.get("config_hash") == h:
                    log.info("%s: finished earlier (%s), skipped", key, result_path)
                    if variant != POPULAR and "vs_popular" not in old and _tested_as(run_dir, old):
                        write_json(result_path, {**old, "vs_popular": _vs_popular(run_cfg, run_dir)})
                    continue
                raise UserError(f"{result_path}: a result for {key} with a different config exists "
                                f"(hash {old.get('config_hash')} vs {h}); use --label to name this setting")
            res = _popular(run_cfg) if variant == POPULAR else _train_and_test(run_cfg, run_dir, overwrite)
            if variant != POPULAR and run_cfg.model.decor.compose:
                res["composition_usage"] = _composition_usage(run_cfg, run_dir)
            if arm is not None:
                res.update(arm=arm, arm_overrides=arm_overrides(cfg, arm))
            row = {"label": name, "variant": variant, "seed": seed, "config_hash": h,
                   "engram": run_cfg.engram.model_dump(mode="json") if variant == "comeir" else None,
                   "model": run_cfg.model.model_dump(mode="json"),
                   "train": resolve_sample_mode(run_cfg).train.model_dump(mode="json"), **res}
            write_json(result_path, row)
            log.info("%s: test item/ndcg@10 %.4f", key, res["metrics"]["item/ndcg@10"])
    rows = load_results(root)
    table = format_table(rows, seed_averaged_vs_popular(cfg.dataset, root, rows))
    write_json(root / "results.json", {"runs": rows})
    with atomic_file(root / "results.md") as tmp:
        tmp.write_text(table + "\n")
    try:
        from comeir_dist.train.experiment_plot import plot_results

        plot_results(rows, root / "results.png")
    except Exception as exc:  # noqa: BLE001 -- a figure must never fail finished runs
        log.warning("%s/results.png not written: %s", root, exc)
    return table
