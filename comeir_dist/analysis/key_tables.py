"""`comeir analyze keys`: how a dataset fills ComeIR's Engram tables, to size them before training.

For every table (memory, level, n-gram order, hash head) of the configured Engram layout: its rows, how many rows
the users' TRAINING sequences address (occupancy), and how many of those rows only ONE user addresses (private
rows: their content after an epoch is that user's own labels, README "What holds ComeIR back"; with
``engram.min_key_users: 2`` they are never read). Counted with the encoder's own key construction and hashing
(:func:`comeir_dist.model.key_support.row_support`): no table is allocated, nothing is trained.

Reading it: occupancy near 1 means the table is smaller than the keys the data produces (hash collisions merge
unrelated n-grams: raise ``engram.s_t`` / ``s_s``); a high private share means that level's n-grams are mostly
user-specific at this data size (memorization rather than shared patterns). ``cross-fit unwritten``: with
``engram.cross_fit`` a user reads the other fold's row of each key; this is the share of (user, row) reads whose
other-fold row no user of that fold addresses -- a row that stays at its random initialisation (the read's
LayerNorm turns it into noise). Folds as at test time (engram/cross_fit.py). Without ``engram.cross_fit`` the column
says what cross-fitting would leave unwritten; with it, a memory left out of ``engram.cross_fit_memories`` shows 0.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from comeir_dist.errors import UserError

FOLD_CAP = 32767  # per-fold user counts are summed into read counts: no practical cap (int16 storage)


def key_table_report(cfg) -> dict:
    """Per table and per (memory, level, order) group: rows, rows addressed, occupancy, private share."""
    from comeir_dist.engram.cross_fit import sequence_folds
    from comeir_dist.model.factory import build_model
    from comeir_dist.model.key_support import fold_row_support
    from comeir_dist.train.samples import train_sequences
    from comeir_dist.train.setup import load_inputs

    if cfg.model.variant != "comeir":
        raise UserError(f"model.variant: {cfg.model.variant}; Engram tables exist for comeir only")
    t0 = time.time()
    sids, emb = load_inputs(cfg)
    model = build_model(cfg, sids.codes, sids.codebooks, emb, sparse_device="meta")
    seqs = train_sequences(cfg.dataset)
    # the folds partition the users, so a row's distinct users are the sum of its two folds' counts
    folds = sequence_folds(seqs, cfg.max_history)
    by_fold = fold_row_support(model, seqs, cfg.max_history, cap=FOLD_CAP)
    tables, groups = [], defaultdict(lambda: {"tables": 0, "rows": 0, "addressed": 0, "private": 0, "reads": 0,
                                              "unwritten": 0})
    for idx in model.lookup.index.values():
        for s in idx.specs:
            a, b = (f[s.name].long() for f in by_fold)
            v = a + b
            addressed, private = int((v > 0).sum()), int((v == 1).sum())
            reads, unwritten = int(a.sum() + b.sum()), int((a * (b == 0)).sum() + (b * (a == 0)).sum())
            if cfg.engram.cross_fit and s.memory not in cfg.engram.cross_fit_memories:
                unwritten = 0  # engram.cross_fit_memories: this memory keeps one row per key, read by all users
            tables.append({"table": s.name, "memory": s.memory, "level": s.level, "order": s.order, "head": s.head,
                           "rows": s.rows, "dim": s.dim, "addressed": addressed, "private": private,
                           "cross_fit_reads": reads, "cross_fit_unwritten": unwritten})
            g = groups[(s.memory, s.level, s.order)]
            g["tables"] += 1
            g["rows"] += s.rows
            g["addressed"] += addressed
            g["private"] += private
            g["reads"] += reads
            g["unwritten"] += unwritten
    summary = []
    for (memory, level, order), g in sorted(groups.items()):
        summary.append({"memory": memory, "level": level, "order": order, "heads": g["tables"], "rows": g["rows"],
                        "occupancy": g["addressed"] / max(1, g["rows"]),
                        "private_share": g["private"] / max(1, g["addressed"]),
                        "cross_fit_unwritten_share": g["unwritten"] / max(1, g["reads"])})
    return {"dataset": cfg.dataset, "users": len(seqs), "engram": cfg.engram.model_dump(mode="json"),
            "users_per_fold": [folds.count(0), folds.count(1)], "groups": summary, "tables": tables,
            "wall_time_s": round(time.time() - t0, 2)}


def format_key_report(rep: dict) -> str:
    e = rep["engram"]
    lines = [f"Engram key tables of {rep['dataset']} ({rep['users']} users' training sequences; s_S {e['s_s']:g}, "
             f"s_T {e['s_t']:g}, d_m {e['d_m']})", "",
             "| memory | level | order | heads | rows | occupancy | private share | cross-fit unwritten |",
             "|---|---|---|---|---|---|---|---|"]
    for g in rep["groups"]:
        lines.append(f"| {g['memory']} | {g['level']} | {g['order']} | {g['heads']} | {g['rows']:,} | "
                     f"{g['occupancy']:.3f} | {g['private_share']:.3f} | {g['cross_fit_unwritten_share']:.3f} |")
    return "\n".join(lines)


def run_key_report(cfg, out: str | None = None) -> dict:
    """The report; with ``out`` also ``out`` (JSON) and ``out`` with suffix ``.md`` (the group table)."""
    from comeir_dist.utils.atomic import write_json_and_markdown
    from comeir_dist.utils.output_guard import check_out_file

    if out:  # before any work
        check_out_file(out)
    rep = key_table_report(cfg)
    if out:
        write_json_and_markdown(Path(out), rep, format_key_report(rep) + "\n")
    return rep
