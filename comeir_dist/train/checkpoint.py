"""Complete, atomic, world-size-independent run checkpoints: ``run/checkpoints/step-N/``.

Layout (every rank writes its own pieces; rank 0 writes ``COMMITTED`` LAST, after a barrier)::

  tables/             torch.distributed.checkpoint (DCP) of every table group's DMP state_dict (ShardedTensor
                      weights) and fused-optimizer state (row-wise Adagrad accumulators); resharded on load
  dense/part-R.pt     full fp32 master weights + AdamW exp_avg / exp_avg_sq of the trainable dense parameters
                      i with i % N == R (N = ranks that wrote it), assembled from the ZeRO partitions
  dense/frozen.pt     frozen parameters (rank 0)
  dense/scheduler.pt  LR scheduler state
  rng/rank-R.pt       python / numpy / torch (/ cuda) RNG states of rank R
  state.json          step, data-loader position (global: epoch, sample offset), AdamW step count, early-stopping
                      state and validation history, world size, ZeRO stage, the RunConfig, hash multipliers,
                      SID-table fingerprint, table column layouts
  COMMITTED           written last; resume only trusts directories that have it

Loading with M ranks a checkpoint written by N ranks:

* tables: DCP reshards every ShardedTensor (table-, row- and column-wise, any N -> M). The row-wise Adagrad
  state of a COLUMN-wise table has one value per (row, column shard); when the column-shard layout
  differs, the state is converted: merging shards (e.g. 2 -> 1) is exact (width-weighted mean of the
  per-shard means of g^2), splitting (1 -> 2) gives each new shard its parent's value (approximate; use
  ``parallel.column_shards`` to keep the layout fixed across world sizes);
* dense: weights and AdamW moments are full tensors, written back into any ZeRO stage / world size with
  DeepSpeed's tensor-fragment API -- the optimizer continues exactly (no re-initialised moments);
* data: the sampler position is global (same seeded permutation on every rank), so M ranks continue at
  the same global sample; each rank takes its slice of every global batch;
* RNG: restored per rank when N == M; otherwise rank r takes the state saved by rank r mod N (it only
  drives dropout).

Runs on several nodes need ``out`` on a filesystem shared by all ranks.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from comeir_dist.errors import UserError

log = logging.getLogger(__name__)
COMMIT = "COMMITTED"
FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


# ---- discovery / retention ------------------------------------------------------------------------------
def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirs(run_dir: Path) -> list[tuple[int, Path, bool]]:
    """(step, dir, committed) of every ``step-N`` dir, ascending by step."""
    root = checkpoints_root(run_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and d.is_dir():
                out.append((int(m.group(1)), d, (d / COMMIT).is_file()))
    return sorted(out)


def latest_committed(run_dir: Path) -> Path | None:
    """Newest committed step checkpoint; partial ones (no COMMITTED) are ignored."""
    done = [d for _, d, ok in step_dirs(run_dir) if ok]
    return done[-1] if done else None


def set_aside(run_dir: Path) -> Path:
    """Rename ``run/checkpoints`` to ``run/checkpoints.stale-<time>`` (a fresh start must not mix with them)."""
    import time

    root = checkpoints_root(run_dir)
    dst = root.with_name(f"checkpoints.stale-{int(time.time())}")
    os.rename(root, dst)
    return dst


def _retain(run_dir: Path, keep: int) -> None:
    dirs = step_dirs(run_dir)
    committed = [d for _, d, ok in dirs if ok]
    for d in committed[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for _, d, ok in dirs:
        if not ok:
            shutil.rmtree(d, ignore_errors=True)


# ---- RNG ---------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ---- sharded tables (DCP) -----------------------------------------------------------------------------------
@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed.checkpoint")
        yield


def _w_key(g: str, k: str) -> str:
    return f"{g}/weight/{k}"


def _o_key(g: str, pk: str, sk: str) -> str:
    return f"{g}/optim/{pk}/{sk}"


def _tables_state(tables) -> tuple[dict, dict]:
    """(flat DCP state {key: ShardedTensor}, {group: fused optimizer state_dict}) -- local views of the shards."""
    from comeir_dist.parallel.engram_tables import group_dmps

    flat, osds = {}, {}
    for g, dmp in group_dmps(tables).items():
        for k, v in dmp.state_dict().items():
            flat[_w_key(g, k)] = v
        osd = dmp.fused_optimizer.state_dict()
        osds[g] = osd
        for pk, st in osd["state"].items():
            for sk, v in st.items():
                if torch.is_tensor(v):
                    flat[_o_key(g, pk, sk)] = v
    return flat, osds


def table_layouts(tables) -> dict:
    """{group: {weight key: {"rows", "dim", "cols": [[col offset, width], ...]}}}: the column shards of each
    table (one [0, dim] entry unless column-wise). Collective-free (global ShardedTensor metadata)."""
    from comeir_dist.parallel.engram_tables import group_dmps

    out: dict = {}
    with _quiet():
        for g, dmp in group_dmps(tables).items():
            for k, v in dmp.state_dict().items():
                rows, dim = (int(x) for x in v.size())
                cols = sorted({(int(s.shard_offsets[1]), int(s.shard_sizes[1])) for s in v.metadata().shards_metadata})
                out.setdefault(g, {})[k] = {"rows": rows, "dim": dim, "cols": [list(c) for c in cols]}
    return out


def save_tables(tables, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    flat, _ = _tables_state(tables)
    with _quiet():
        dcp.save(flat, checkpoint_id=str(path))


def _convert_rowwise(saved: torch.Tensor, rows: int, old_cols: list, new_cols: list, shard_index: int) -> torch.Tensor:
    """Row-wise state for new column shard ``shard_index`` from the per-old-shard states ``saved [rows*K_old]``:
    overlap-weighted mean (exact when the new shard is a union of old shards)."""
    a, wa = new_cols[shard_index]
    acc = torch.zeros(rows, dtype=torch.float64)
    for i, (c, w) in enumerate(old_cols):
        ov = max(0, min(a + wa, c + w) - max(a, c))
        if ov:
            acc += saved[i * rows:(i + 1) * rows].double() * (ov / wa)
    return acc


def load_tables(tables, path: Path, saved_layout: dict) -> list[str]:
    """Load weights and optimizer state into the current sharding; returns notes on converted state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    flat, _ = _tables_state(tables)
    cur_layout = table_layouts(tables)
    if set(saved_layout) != set(cur_layout):
        raise UserError(f"{path}: table groups differ from the model ({sorted(saved_layout)[:3]} vs "
                        f"{sorted(cur_layout)[:3]})")
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in flat if k not in meta]
    if missing:
        raise UserError(f"{path}: checkpoint lacks table state {missing[:3]} (Engram config changed?)")
    converted: dict[str, tuple] = {}
    notes = []
    for g, per in cur_layout.items():
        for wk, lay in per.items():
            old = saved_layout[g].get(wk)
            if old is None or (old["rows"], old["dim"]) != (lay["rows"], lay["dim"]):
                raise UserError(f"{path}: table {g}/{wk} has another shape in the checkpoint")
            if old["cols"] == lay["cols"]:
                continue
            for key in [k for k in flat if k.startswith(f"{g}/optim/{wk}/")]:
                size = tuple(meta[key].size)
                if len(size) != 1 or size[0] != lay["rows"] * len(old["cols"]):
                    raise UserError(f"{path}: cannot convert optimizer state {key} {size} to another column layout")
                converted[key] = (flat[key], old["cols"], lay["cols"], lay["rows"])
                flat[key] = torch.zeros(size, dtype=flat[key].dtype)
                kind = "merged exactly" if len(lay["cols"]) < len(old["cols"]) else "split (approximate)"
                notes.append(f"{key}: {len(old['cols'])} -> {len(lay['cols'])} column shards, row-wise state {kind}")
    with _quiet():
        dcp.load(flat, checkpoint_id=str(path))
        for key, (st, old_cols, new_cols, rows) in converted.items():
            assert isinstance(st, ShardedTensor)
            for shard in st.local_shards():
                j = int(shard.metadata.shard_offsets[0]) // rows
                shard.tensor.copy_(_convert_rowwise(flat[key], rows, old_cols, new_cols, j).to(shard.tensor.dtype))
    return notes


# ---- the whole run state ----------------------------------------------------------------------------------
def save_run_checkpoint(run_dir: Path, step: int, *, env, model, dense, cfg, sampler_state: dict, loop_state: dict,
                        frozen: dict, sid_fingerprint: str, keep: int) -> Path:
    """Collective: every rank calls it. Returns ``run/checkpoints/step-N`` (committed)."""
    from comeir_dist.train.checkpoint_simple import hash_state

    d = checkpoints_root(run_dir) / f"step-{step}"
    if env.is_main:
        if d.exists():
            shutil.rmtree(d)  # a partial (or superseded) write of the same step
        for sub in ("dense", "rng"):
            (d / sub).mkdir(parents=True)
    env.barrier()
    has_tables = hasattr(model, "tables")
    if has_tables:
        save_tables(model.tables, d / "tables")
    parts = dense.full_state_parts(env.rank, env.world_size)
    torch.save(parts, d / "dense" / f"part-{env.rank:05d}.pt")
    torch.save(rng_state(), d / "rng" / f"rank-{env.rank:05d}.pt")
    layout = table_layouts(model.tables) if has_tables else {}
    if env.is_main:
        torch.save(frozen, d / "dense" / "frozen.pt")
        torch.save(dense.scheduler_state(), d / "dense" / "scheduler.pt")
        state = {"format": FORMAT, "step": step, "world_size": env.world_size, "sampler": sampler_state,
                 "loop": loop_state, "optimizer_step": dense.optimizer_step_count(), "zero_stage": dense.stage,
                 "bf16": bool(cfg.train.bf16), "config": cfg.model_dump(mode="json"),
                 "sid_fingerprint": sid_fingerprint, "hash_multipliers": hash_state(model), "table_layout": layout,
                 "dense_parts": env.world_size, "variant": cfg.model.variant}
        (d / "state.json").write_text(json.dumps(state, indent=1))
    env.barrier()  # every rank's files are on disk
    if env.is_main:
        tmp = d / f".{COMMIT}.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, d / COMMIT)
        _retain(run_dir, keep)
    env.barrier()
    return d


def read_state(path: Path) -> dict:
    path = Path(path)
    if not (path / COMMIT).is_file():
        raise UserError(f"{path}: not a committed checkpoint (missing {COMMIT})")
    return json.loads((path / "state.json").read_text())


def check_compatible(path: Path, state: dict, cfg, model, sid_fingerprint: str, n_samples: int) -> None:
    from comeir_dist.train.checkpoint_simple import hash_state

    if state.get("format") != FORMAT:
        raise UserError(f"{path}: checkpoint format {state.get('format')} is not supported (expected {FORMAT})")
    if state["sid_fingerprint"] != sid_fingerprint:
        raise UserError(f"{path}: checkpoint was trained on another SID table")
    if state["hash_multipliers"] != hash_state(model):
        raise UserError(f"{path}: Engram hash multipliers/table sizes differ from the config")
    saved = state["config"]
    now = cfg.model_dump(mode="json")
    for section in ("model", "engram", "max_history", "seed"):
        if saved.get(section) != now.get(section):
            raise UserError(f"{path}: config '{section}' differs from the checkpoint's; resume needs the same "
                            f"model (start a new run dir or set parallel.resume: false)")
    if state["sampler"]["n"] != n_samples:
        raise UserError(f"{path}: the dataset has {n_samples} training samples, the checkpoint {state['sampler']['n']}")


def load_run_checkpoint(path: Path, *, env, model, dense, zero_step) -> dict:
    """Restore tables, dense weights + optimizer, scheduler and RNG; returns the saved state.json.
    Collective: every rank calls it. Call :func:`check_compatible` first."""
    path = Path(path)
    state = read_state(path)
    if hasattr(model, "tables"):
        for note in load_tables(model.tables, path / "tables", state["table_layout"]):
            log.warning("resume: %s", note)
    params: dict = {}
    moments: dict = {"exp_avg": {}, "exp_avg_sq": {}}
    for r in range(int(state["dense_parts"])):
        part = torch.load(path / "dense" / f"part-{r:05d}.pt", weights_only=True)
        params.update(part["params"])
        for k in moments:
            moments[k].update(part.get(k, {}))
    has_moments = all(len(moments[k]) == len(params) for k in moments) and len(params) > 0
    dense.load_full_state(params, moments if has_moments else None, int(state["optimizer_step"]), zero_step)
    dense.load_scheduler_state(torch.load(path / "dense" / "scheduler.pt", weights_only=False))
    saved_world = int(state["world_size"])
    if saved_world != env.world_size:
        log.warning("resume: checkpoint written by %d ranks, running on %d: tables resharded, dense weights and "
                    "AdamW moments restored in full, data position continues at global sample %s; rank r uses the "
                    "RNG state of saved rank r mod %d", saved_world, env.world_size, state["sampler"], saved_world)
    set_rng_state(torch.load(path / "rng" / f"rank-{env.rank % saved_world:05d}.pt", weights_only=False))
    return state
