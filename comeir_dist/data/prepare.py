"""`comeir prepare`: raw data -> k-core filtered, remapped, leave-one-out Parquet dataset (optionally K validation
and K' test targets per user, ``prepare.valid_targets`` / ``prepare.test_targets``)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from comeir_dist.config.pipeline import PrepareConfig
from comeir_dist.data.dataset_output import (PREPARED_FILES, derived_artefacts, input_fingerprint,
                                             remove_artefacts, same_key_tables)
from comeir_dist.data.kcore import dedupe_consecutive_repeats, k_core
from comeir_dist.data.readers import RawData, read_raw
from comeir_dist.data.schema import (ITEM_TEXT_FIELDS, ITEMS_SCHEMA, SEQUENCES_SCHEMA, SPLIT_SCHEMA,
                                     USERS_SCHEMA)
from comeir_dist.errors import UserError
from comeir_dist.utils.atomic import atomic_update
from comeir_dist.utils.output_guard import MARKER, check_out_dir, write_marker

log = logging.getLogger(__name__)
MIN_SPLIT_LEN = 3  # train >= 1 item, plus a validation and a test target


def _numeric_key(raw: str):
    """Order of raw ids: ASCII-digit ids numerically first (keeps the bundled ids' order), then all others as
    strings. No int() (ids such as '--5', '²' or 5000 digits must not fail); the text breaks ties ('7' vs
    '007'), so the order is total and the same on every run."""
    if raw.isascii() and raw.isdigit():
        digits = raw.lstrip("0")
        return (0, len(digits), digits, raw)
    return (1, 0, "", raw)


def _filter(raw: RawData, cfg: PrepareConfig) -> dict[str, list[str]]:
    missing = sorted({i for s in raw.sequences.values() for i in s} - raw.items.keys(), key=_numeric_key)
    if missing:
        raise UserError(f"{raw.source}: {len(missing)} item(s) referenced by interactions are absent from the "
                        f"item table, e.g. item_id {missing[0]!r}")
    seqs = k_core(dedupe_consecutive_repeats(raw.sequences), cfg.k_core)
    if not seqs:
        raise UserError(f"{raw.source}: no user or item survives the {cfg.k_core}-core filter "
                        f"({len(raw.sequences)} users before filtering); lower --k-core")
    short = [u for u, s in seqs.items() if len(s) < MIN_SPLIT_LEN]
    if short:
        log.warning("dropping %d user(s) with fewer than %d items (no leave-one-out split)", len(short), MIN_SPLIT_LEN)
        seqs = {u: s for u, s in seqs.items() if len(s) >= MIN_SPLIT_LEN}
        if not seqs:
            raise UserError(f"{raw.source}: every user has fewer than {MIN_SPLIT_LEN} items after filtering")
    if not any(len(s) > MIN_SPLIT_LEN for s in seqs.values()):
        raise UserError(f"{raw.source}: no training sample: all {len(seqs)} user(s) have exactly {MIN_SPLIT_LEN} items "
                        f"after filtering, so each train sequence (all but the last 2 items) is a single item with "
                        f"no next item to predict; at least one user needs >= {MIN_SPLIT_LEN + 1} items")
    return seqs


def held_out_counts(length: int, valid_targets: int, test_targets: int = 1) -> tuple[int, int]:
    """(validation, test) targets of a user with ``length`` items: up to ``test_targets`` last items, then up to
    ``valid_targets`` before them; at least one of each, and a user with 4 or more items keeps >= 2 training items
    (one transition), so extra targets never take a user's last training transition. With one test target this is
    the rule ``min(K, max(1, n - 3))`` validation targets of the option's first version."""
    k_test = min(test_targets, max(1, length - 3))
    return min(valid_targets, max(1, length - 2 - k_test)), k_test


def split_rows(mapped: list[list[int]], valid_targets: int, test_targets: int = 1) -> tuple[list, dict, dict]:
    """(train sequences, valid columns, test columns) of users' item lists: the last ``test_targets`` items are
    test targets and the ``valid_targets`` items before them validation targets (counts per user:
    :func:`held_out_counts`), each row with every item before its target as history, oldest first within a user;
    training keeps the items before the first validation target."""
    train = []
    valid = {"user_idx": [], "history": [], "target": []}
    test = {"user_idx": [], "history": [], "target": []}
    for u, s in enumerate(mapped):
        k_valid, k_test = held_out_counts(len(s), valid_targets, test_targets)
        first_test = len(s) - k_test
        train.append(s[:first_test - k_valid])
        for pos in range(first_test - k_valid, len(s)):
            cols = valid if pos < first_test else test
            cols["user_idx"].append(u), cols["history"].append(s[:pos]), cols["target"].append(s[pos])
    return train, valid, test


def build_tables(raw: RawData, cfg: PrepareConfig) -> tuple[dict[str, pa.Table], dict]:
    """Pure function: filtered, remapped tables plus stats (no I/O)."""
    seqs = _filter(raw, cfg)
    users = sorted(seqs, key=_numeric_key)
    item_ids = sorted({i for s in seqs.values() for i in s}, key=_numeric_key)
    item_idx = {r: n for n, r in enumerate(item_ids)}
    mapped = [[item_idx[i] for i in seqs[u]] for u in users]
    uidx = list(range(len(users)))
    train, valid, test = split_rows(mapped, cfg.valid_targets, cfg.test_targets)
    items_cols = {"item_idx": list(range(len(item_ids))), "raw_id": item_ids}
    for f in ITEM_TEXT_FIELDS:
        items_cols[f] = [raw.items[r].get(f) for r in item_ids]
    tables = {
        "items": pa.table(items_cols, schema=ITEMS_SCHEMA),
        "users": pa.table({"user_idx": uidx, "raw_id": users}, schema=USERS_SCHEMA),
        "sequences": pa.table({"user_idx": uidx, "items": mapped}, schema=SEQUENCES_SCHEMA),
        "train": pa.table({"user_idx": uidx, "items": train}, schema=SEQUENCES_SCHEMA),
        "valid": pa.table(valid, schema=SPLIT_SCHEMA),
        "test": pa.table(test, schema=SPLIT_SCHEMA),
    }
    lengths = [len(s) for s in mapped]
    stats = {
        "users": len(users),
        "items": len(item_ids),
        "interactions": sum(lengths),
        "users_before_filter": len(raw.sequences),
        "items_before_filter": len(raw.items),
        "interactions_before_filter": sum(len(s) for s in raw.sequences.values()),
        "k_core": cfg.k_core,
        "max_history": cfg.max_history,
        "min_seq_len": min(lengths),
        "max_seq_len": max(lengths),
        "mean_seq_len": round(sum(lengths) / len(lengths), 3),
        "valid_targets": cfg.valid_targets,
        "valid_rows": len(valid["target"]),
        **({"test_targets": cfg.test_targets, "test_rows": len(test["target"])} if cfg.test_targets != 1 else {}),
        "train_samples": sum(max(0, len(s) - 1) for s in train),
        "source": raw.source,
    }
    return tables, stats


def run_prepare(cfg: PrepareConfig, overwrite: bool = False) -> Path:
    """Read, filter and split; write DIR. Returns the dataset directory.

    DIR may be new, empty, or a dataset comeir prepared: with unchanged inputs (fingerprint of the input
    files + parameters) nothing is redone; otherwise only the prepared tables and stats are replaced, and
    the embeddings / SIDs of later stages are kept while the items and sequences stay the same. Inputs that
    change them, or a DIR holding anything else, are refused unless ``overwrite`` (see utils.output_guard)."""
    t0 = time.time()
    out = Path(cfg.out)
    state = check_out_dir(out, "dataset", overwrite=overwrite)
    fp = input_fingerprint(cfg)
    if (state.kind == "dataset" and state.marker and state.marker.get("fingerprint") == fp
            and all((out / f).is_file() for f in PREPARED_FILES)):
        log.info("prepared %s is up to date (same inputs and parameters): nothing to do", out)
        return out
    raw = read_raw(cfg.input, cfg.items)
    tables, stats = build_tables(raw, cfg)
    stale = []
    if state.kind == "dataset" and not same_key_tables(out, tables):
        stale = derived_artefacts(out)
        if stale and not overwrite:
            raise UserError(f"--out {out}: the inputs or parameters changed since this dataset was prepared, "
                            f"which would make {', '.join(stale)} stale; choose another --out or pass --overwrite "
                            f"(deletes them)")
    with atomic_update(out) as tmp:
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        stats["wall_time_s"] = round(time.time() - t0, 3)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (out / MARKER).unlink(missing_ok=True)  # until the new marker: a half-replaced dir is not "up to date"
        if stale:
            log.warning("--overwrite: deleting %s of %s (computed from the previous tables)", ", ".join(stale), out)
            remove_artefacts(out, stale)
    write_marker(out, "dataset", fp, "comeir prepare", files=list(PREPARED_FILES),
                 params={"input": cfg.input, "items": cfg.items, "k_core": cfg.k_core,
                         "max_history": cfg.max_history, "valid_targets": cfg.valid_targets,
                         **({"test_targets": cfg.test_targets} if cfg.test_targets != 1 else {})})
    kept = derived_artefacts(out)
    log.info("prepared %s: %d users, %d items, %d interactions%s", out, stats["users"], stats["items"],
             stats["interactions"], f" (kept {', '.join(kept)})" if kept else "")
    return out
