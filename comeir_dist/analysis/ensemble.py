"""`comeir analyze ensemble`: fuse a generative (SID) recommender with the SASRec item-ID baseline per instance
(Ding et al., "How Well Does Generative Recommendation Generalize?", adaptive ensembling).

Inputs: the top-N files ``comeir evaluate --save-top N`` writes (``<out>.top.parquet``: per user the top-N items with
scores -- beam log-probabilities of a SID model, logits of SASRec -- and SASRec's maximum softmax probability
``msp``), for the validation AND the test split of both models. ``--gr`` / ``--id`` name either a dir holding
``valid.top.parquet`` and ``test.top.parquet`` -- the run dir itself or its ``top/`` (``comeir evaluate --checkpoint
RUN/best --split valid --out RUN/top/valid.json --save-top 50``, the same with ``test``; ``top/`` keeps the run's
own ``test.json`` of the configured beam) -- or one of the two files (its sibling of the other split is found by
swapping the split in the file name).

Fusion of instance ``u`` (``s`` = the model's scores min-max normalised over ITS top-N list of that instance; a
constant list normalises to 1; candidates = union of the two lists, a model that did not list an item gives 0)::

    fused(x) = alpha_u * s_ID(x) + (1 - alpha_u) * s_GR(x)

* fixed: one ``alpha`` for every instance, grid 0, 0.1, ..., 0.9 (weight of the SASRec side);
* adaptive: ``alpha_u = sigmoid(k * (msp_u - tau))`` -- a confident SASRec (high MSP: a memorised transition)
  gets more weight. ``k`` from ``--k-grid``; ``tau`` from quantiles 0.05 .. 0.95 of the VALIDATION MSPs.

Ranking: fused score descending; ties by the rank in the model with the larger weight (SASRec when
``alpha_u >= 0.5``), then by the rank in the other model (unlisted = after all listed), then by item index. Hence
``alpha = 1`` reproduces SASRec's list and ``alpha = 0`` the SID model's (a SID collision group keeps its listed
order). Metrics: Hit/NDCG@K of the target's position in that ranking (one position per item, ``G = 1``; a
target in neither list is a miss) -- the components are scored by the same code (``alpha`` = 0 / 1) on the same
lists, so every number in the report is comparable (a SID model's tie-group averaging of ``comeir evaluate`` is
not applied here).

Selection: ``alpha`` and ``(k, tau)`` maximise validation item/ndcg@10 (ties: first in grid order); only the
validation files are read while choosing -- the test files are opened afterwards and only scored.
Output (``--out``, an "analysis" dir): ``ensemble.json`` and ``ensemble.md``, written atomically.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from comeir_dist.errors import UserError

log = logging.getLogger(__name__)

TOP_SUFFIX = ".top.parquet"  # = eval.run_eval.TOP_SUFFIX
SPLITS = ("valid", "test")
KS = (5, 10, 20)
ALPHAS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9
K_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
TAU_QUANTILES = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
JSON_FILE, MARKDOWN_FILE = "ensemble.json", "ensemble.md"
COMMAND = "comeir analyze ensemble"


# ---- inputs ---------------------------------------------------------------------------------------------------
@dataclass
class TopN:
    """One model's top-N lists on one split, rows sorted by ``users``."""

    path: Path
    split: str
    variant: str
    users: np.ndarray    # [U] int64
    target: np.ndarray   # [U] int64
    items: np.ndarray    # [U, N] int64, -1 padding
    scores: np.ndarray   # [U, N] float64, -inf padding
    msp: Optional[np.ndarray] = None  # [U] float64 (sasrec)
    info: dict = field(default_factory=dict)


def _info(path: Path) -> dict:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a Parquet file ({exc.__class__.__name__})") from None
    raw = meta.get(b"comeir")
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def _hint(run: Path, split: str) -> str:
    return (f"write it with `comeir evaluate --checkpoint {run}/best --split {split} --out {run}/top/{split}.json "
            f"--save-top 50`")


def resolve_top_files(spec: str, flag: str) -> Dict[str, Path]:
    """{"valid": path, "test": path} of ``--gr`` / ``--id`` (a run dir or one of its two top-N files)."""
    p = Path(spec)
    if p.is_dir():
        for d in (p, p / "top"):  # the run dir itself, or its top/ (beside the experiment's own test.json)
            files = {s: d / f"{s}{TOP_SUFFIX}" for s in SPLITS}
            if all(f.is_file() for f in files.values()):
                return files
        d = p / "top" if (p / "top").is_dir() else p
        s = next(s for s in SPLITS if not (d / f"{s}{TOP_SUFFIX}").is_file())
        raise UserError(f"{flag} {spec}: no {s}{TOP_SUFFIX} (the {s} top-N lists); {_hint(p, s)}")
    if not p.is_file():
        raise UserError(f"{flag} {spec}: no such run dir or top-N file")
    split = _info(p).get("split")
    if split not in SPLITS:
        split = next((s for s in SPLITS if p.name.startswith(s)), None)
    if split is None:
        raise UserError(f"{flag} {spec}: cannot tell its split (no comeir metadata, name not valid*/test*)")
    other = "test" if split == "valid" else "valid"
    sib = p.with_name(p.name.replace(split, other, 1))
    if sib == p or not sib.is_file():
        raise UserError(f"{flag} {spec}: no {other} top-N file beside it ({sib.name}); the ensemble is chosen on "
                        f"validation and reported on test, so both are needed")
    return {split: p, other: sib}


def read_top(path: Path, top: int, expect_split: str, flag: str) -> TopN:
    """The top-``top`` lists of a ``*.top.parquet`` file (UserError when it is shorter or not one)."""
    import pyarrow.parquet as pq

    info = _info(path)
    t = pq.read_table(path)
    need = {"user_idx", "target", "items", "scores"}
    if not need <= set(t.column_names):
        raise UserError(f"{flag} {path}: not a top-N file (columns {sorted(t.column_names)}; need {sorted(need)})")
    if info.get("split", expect_split) != expect_split:
        raise UserError(f"{flag} {path}: holds the {info['split']} split, expected {expect_split}")
    n_file = int(info.get("top_n", 0)) or max((len(x) for x in t.column("items").to_pylist()), default=0)
    if n_file < top:
        raise UserError(f"{flag} {path}: top-{n_file} lists, --top {top} needs at least {top} (rerun comeir evaluate "
                        f"with --save-top {top}, or lower --top)")
    users = np.asarray(t.column("user_idx").to_pylist(), np.int64)
    order = np.argsort(users, kind="stable")
    if len(np.unique(users)) != len(users):
        raise UserError(f"{flag} {path}: a user appears twice (a dataset prepared with --valid-targets or "
                        f"--test-targets > 1 has several rows per user; fit the fusion on a leave-one-out dataset)")
    U = len(users)
    items = np.full((U, top), -1, np.int64)
    scores = np.full((U, top), -np.inf, np.float64)
    for u, (it, sc) in enumerate(zip(t.column("items").to_pylist(), t.column("scores").to_pylist())):
        m = min(top, len(it))
        items[u, :m] = it[:m]
        scores[u, :m] = [(-np.inf if v is None else v) for v in sc[:m]]
    items[~np.isfinite(scores)] = -1
    scores[items < 0] = -np.inf
    msp = np.asarray(t.column("msp").to_pylist(), np.float64)[order] if "msp" in t.column_names else None
    return TopN(path=path, split=expect_split, variant=str(info.get("variant", "?")), users=users[order],
                target=np.asarray(t.column("target").to_pylist(), np.int64)[order], items=items[order],
                scores=scores[order], msp=msp, info=info)


def check_pair(gr: TopN, idm: TopN) -> None:
    if not np.array_equal(gr.users, idm.users):
        raise UserError(f"{gr.path} and {idm.path}: different users ({len(gr.users)} vs {len(idm.users)}); evaluate "
                        f"both models on the same split and users (no --max-users, or the same)")
    if not np.array_equal(gr.target, idm.target):
        raise UserError(f"{gr.path} and {idm.path}: the same users have different targets (another dataset?)")
    if idm.msp is None:
        raise UserError(f"--id {idm.path}: no msp column; the adaptive weight needs SASRec's top-N file "
                        f"(model.variant sasrec, comeir evaluate --save-top)")


# ---- fusion ---------------------------------------------------------------------------------------------------
def minmax(scores: np.ndarray) -> np.ndarray:
    """Per-row min-max normalisation over the finite entries (a constant row -> 1; padding -> 0)."""
    finite = np.isfinite(scores)
    lo = np.where(finite, scores, np.inf).min(1, keepdims=True)
    hi = np.where(finite, scores, -np.inf).max(1, keepdims=True)
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(finite, norm, 0.0)


@dataclass
class Candidates:
    """Union of two top-N lists per instance, ``[U, 2N]`` (the ID list's duplicates of GR items are invalid)."""

    items: np.ndarray    # int64, -1 = no candidate
    valid: np.ndarray    # bool
    s_gr: np.ndarray     # normalised GR score (0 if not listed by GR)
    s_id: np.ndarray     # normalised ID score (0 if not listed by ID)
    r_gr: np.ndarray     # 1-based rank in the GR list (large if not listed)
    r_id: np.ndarray     # 1-based rank in the ID list (large if not listed)
    t_pos: np.ndarray    # [U] position of the target among the candidates, -1 if absent


def _listed(cand: np.ndarray, items: np.ndarray, norm: np.ndarray, big: int, chunk: int = 2048):
    """(normalised score, 1-based rank) in the list ``items`` of every candidate; ``(0, big)`` when unlisted."""
    U, M = cand.shape
    score, rank = np.zeros((U, M)), np.full((U, M), big, np.int64)
    for s in range(0, U, chunk):
        c, it = cand[s:s + chunk], items[s:s + chunk]
        eq = (c[:, :, None] == it[:, None, :]) & (it[:, None, :] >= 0)  # [u, M, N]
        listed = eq.any(-1)
        pos = eq.argmax(-1)
        score[s:s + chunk] = np.where(listed, np.take_along_axis(norm[s:s + chunk], pos, 1), 0.0)
        rank[s:s + chunk] = np.where(listed, pos + 1, big)
    return score, rank


def candidates(gr: TopN, idm: TopN, target: Optional[np.ndarray] = None) -> Candidates:
    U, n_gr = gr.items.shape
    big = n_gr + idm.items.shape[1] + 1
    cand = np.concatenate([gr.items, idm.items], 1)
    s_gr, r_gr = _listed(cand, gr.items, minmax(gr.scores), big)
    s_id, r_id = _listed(cand, idm.items, minmax(idm.scores), big)
    valid = cand >= 0
    valid[:, n_gr:] &= r_gr[:, n_gr:] == big  # an ID item the GR list holds is already a candidate
    t_pos = np.full(U, -1, np.int64)
    if target is not None:
        hit = valid & (cand == np.asarray(target)[:, None])
        t_pos = np.where(hit.any(1), hit.argmax(1), -1)
    return Candidates(cand, valid, s_gr, s_id, r_gr, r_id, t_pos)


def _keys(c: Candidates, alpha: np.ndarray):
    """(fused, dominant rank, other rank, item) -- the ranking is fused desc, then the ranks / item asc."""
    a = np.asarray(alpha, np.float64).reshape(-1, 1)
    fused = a * c.s_id + (1.0 - a) * c.s_gr
    id_first = a >= 0.5
    dom = np.where(id_first, c.r_id, c.r_gr)
    oth = np.where(id_first, c.r_gr, c.r_id)
    return fused, dom, oth, c.items


def fused_order(c: Candidates, alpha) -> np.ndarray:
    """Fused ranking per instance: item indices ``[U, 2N]`` best first, ``-1`` after the candidates."""
    U = c.items.shape[0]
    fused, dom, oth, items = _keys(c, np.broadcast_to(np.asarray(alpha, np.float64), (U,)))
    fused = np.where(c.valid, fused, -np.inf)
    order = np.lexsort((items, oth, dom, (~c.valid).astype(np.int8), -fused), axis=-1)
    out = np.take_along_axis(np.where(c.valid, items, -1), order, 1)
    return out


def target_ranks(c: Candidates, alpha) -> np.ndarray:
    """1-based position of each instance's target in the fused ranking, 0 when it is not a candidate."""
    U = c.items.shape[0]
    fused, dom, oth, items = _keys(c, np.broadcast_to(np.asarray(alpha, np.float64), (U,)))
    found = c.t_pos >= 0
    tp = np.where(found, c.t_pos, 0)[:, None]
    ft, dt, ot, it = (np.take_along_axis(x, tp, 1) for x in (fused, dom, oth, items))
    better = (fused > ft) | ((fused == ft) & ((dom < dt) | ((dom == dt) & ((oth < ot) | ((oth == ot) & (items < it))))))
    rank = (better & c.valid).sum(1) + 1
    return np.where(found, rank, 0)


def metrics_of(rank: np.ndarray, ks: Sequence[int] = KS) -> Dict[str, float]:
    """Mean item Hit@K / NDCG@K (+ standard errors) of 1-based ranks (0 = miss), with ``eval.metrics``."""
    from comeir_dist.eval.metrics import MetricSums

    found = rank > 0
    P = np.where(found, rank - 1, 0)
    m = MetricSums.from_arrays(P, np.ones_like(P), found, rank, ks).means()
    return {k: v for k, v in m.items() if not k.startswith(("sid/", "se/sid/"))}


def adaptive_alpha(msp: np.ndarray, k: float, tau: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-float(k) * (np.asarray(msp, np.float64) - float(tau))))


# ---- selection (validation only) ----------------------------------------------------------------------------------
@dataclass
class Choice:
    alpha: float
    k: float
    tau: float
    tau_quantile: float
    fixed_grid: list  # [{"alpha", "item/ndcg@10"}] on validation
    adaptive_grid: list  # [{"k", "tau", "tau_quantile", "item/ndcg@10"}] on validation
    valid: Dict[str, Dict[str, float]]  # metrics of gr / id / fixed / adaptive on validation


def choose(gr_valid: TopN, id_valid: TopN, k_grid: Sequence[float] = K_GRID,
           tau_quantiles: Sequence[float] = TAU_QUANTILES, alphas: Sequence[float] = ALPHAS) -> Choice:
    """``alpha`` (fixed) and ``(k, tau)`` (adaptive) with the best validation item/ndcg@10. Reads validation only."""
    check_pair(gr_valid, id_valid)
    c = candidates(gr_valid, id_valid, gr_valid.target)
    key = "item/ndcg@10"
    fixed = [{"alpha": float(a), key: metrics_of(target_ranks(c, a))[key]} for a in alphas]
    best_fixed = max(range(len(fixed)), key=lambda i: (fixed[i][key], -i))  # ties: first in grid order
    taus = np.quantile(id_valid.msp, list(tau_quantiles)) if len(id_valid.msp) else np.zeros(len(tau_quantiles))
    adaptive = []
    for k in k_grid:
        for q, tau in zip(tau_quantiles, taus):
            a = adaptive_alpha(id_valid.msp, k, tau)
            adaptive.append({"k": float(k), "tau": float(tau), "tau_quantile": float(q),
                             key: metrics_of(target_ranks(c, a))[key]})
    best_ad = max(range(len(adaptive)), key=lambda i: (adaptive[i][key], -i))
    ch = adaptive[best_ad]
    alpha = fixed[best_fixed]["alpha"]
    valid = score_split(c, alpha, ch["k"], ch["tau"], id_valid.msp)
    return Choice(alpha=alpha, k=ch["k"], tau=ch["tau"], tau_quantile=ch["tau_quantile"], fixed_grid=fixed,
                  adaptive_grid=adaptive, valid=valid)


def score_split(c: Candidates, alpha: float, k: float, tau: float, msp: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Metrics of both components and both fusions on one split's candidates."""
    return {"gr": metrics_of(target_ranks(c, 0.0)), "id": metrics_of(target_ranks(c, 1.0)),
            "fixed": metrics_of(target_ranks(c, alpha)),
            "adaptive": metrics_of(target_ranks(c, adaptive_alpha(msp, k, tau)))}


# ---- report -----------------------------------------------------------------------------------------------------
def format_markdown(rep: dict) -> str:
    ch = rep["chosen"]
    cols = [f"item/{m}@{k}" for k in KS for m in ("hit", "ndcg")]
    names = {"gr": f"GR ({rep['inputs']['gr']['variant']})", "id": f"ID ({rep['inputs']['id']['variant']})",
             "fixed": f"fixed alpha={ch['alpha']:g}",
             "adaptive": f"adaptive k={ch['k']:g}, tau={ch['tau']:.4g} (q{ch['tau_quantile']:g})"}
    lines = [f"# Ensemble of {names['gr']} and {names['id']} (top-{rep['top']} lists)", "",
             (f"Chosen on validation item/ndcg@10: fixed alpha = {ch['alpha']:g} (SASRec weight); adaptive alpha = "
              f"sigmoid(k (MSP - tau)) with k = {ch['k']:g}, tau = {ch['tau']:.6g} (validation MSP quantile "
              f"{ch['tau_quantile']:g})."), ""]
    for split in ("test", "valid"):
        lines += [f"## {split} ({rep[split]['users']} users)", "",
                  "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for name in ("gr", "id", "fixed", "adaptive"):
            m = rep[split]["metrics"][name]
            lines.append(f"| {names[name]} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
        lines.append("")
    lines += ["## Fixed weight on validation", "", "| alpha | item/ndcg@10 |", "|---|---|"]
    lines += [f"| {r['alpha']:g} | {r['item/ndcg@10']:.4f} |" for r in rep["selection"]["fixed_grid"]]
    lines += ["", ("Ranking: fused score, ties by the rank in the heavier-weighted model, then the other model, then "
                   "item index; metrics count one position per item (G = 1). Parameters chosen on validation only."), ""]
    return "\n".join(lines)


def run_ensemble(gr: str, idm: str, out: str, top: int = 50, k_grid: Sequence[float] = K_GRID,
                 tau_quantiles: Sequence[float] = TAU_QUANTILES, overwrite: bool = False) -> dict:
    """The body of `comeir analyze ensemble` (see the module docstring); returns the report (ensemble.json)."""
    from comeir_dist.utils.atomic import atomic_update, write_json
    from comeir_dist.utils.output_guard import check_out_dir, claim_out_dir, fingerprint

    t0 = time.perf_counter()
    if top < 1:
        raise UserError(f"--top: {top}; must be >= 1")
    if not k_grid or any(not np.isfinite(k) or k <= 0 for k in k_grid):
        raise UserError(f"--k-grid: {list(k_grid)}; positive numbers")
    check_out_dir(out, "analysis", overwrite=overwrite)  # before any work
    files = {"gr": resolve_top_files(gr, "--gr"), "id": resolve_top_files(idm, "--id")}
    # 1. choose on validation (the test files are not opened yet)
    valid = {m: read_top(files[m]["valid"], top, "valid", f"--{m}") for m in files}
    choice = choose(valid["gr"], valid["id"], k_grid, tau_quantiles)
    # 2. score on test with the chosen parameters
    test = {m: read_top(files[m]["test"], top, "test", f"--{m}") for m in files}
    check_pair(test["gr"], test["id"])
    c_test = candidates(test["gr"], test["id"], test["gr"].target)
    test_metrics = score_split(c_test, choice.alpha, choice.k, choice.tau, test["id"].msp)
    rep = {"top": top,
           "inputs": {m: {"variant": valid[m].variant, "valid": str(files[m]["valid"]), "test": str(files[m]["test"]),
                          "checkpoint": valid[m].info.get("checkpoint")} for m in files},
           "chosen": {"alpha": choice.alpha, "k": choice.k, "tau": choice.tau, "tau_quantile": choice.tau_quantile,
                      "criterion": "valid item/ndcg@10"},
           "test": {"users": len(test["gr"].users), "metrics": test_metrics},
           "valid": {"users": len(valid["gr"].users), "metrics": choice.valid},
           "selection": {"fixed_grid": choice.fixed_grid, "adaptive_grid": choice.adaptive_grid,
                         "k_grid": [float(k) for k in k_grid], "tau_quantiles": [float(q) for q in tau_quantiles]},
           "definitions": "scores min-max normalised per instance over each model's top-N, union of candidates "
                          "(unlisted = 0); fused = alpha * ID + (1 - alpha) * GR; adaptive alpha = sigmoid(k (MSP - "
                          "tau)); ties by the heavier model's rank, the other model's rank, item index; G = 1"}
    markdown = format_markdown(rep)
    fp = fingerprint({"inputs": {m: {s: str(Path(p).resolve()) for s, p in f.items()} for m, f in files.items()},
                      "top": top, "k_grid": list(k_grid), "tau_quantiles": list(tau_quantiles)})
    claim_out_dir(out, "analysis", fp, COMMAND, overwrite=overwrite)
    rep["wall_time_s"] = round(time.perf_counter() - t0, 3)
    with atomic_update(out) as tmp:
        write_json(tmp / JSON_FILE, rep)
        (tmp / MARKDOWN_FILE).write_text(markdown)
    return rep
