"""Complete, atomic, world-size-independent run checkpoints: ``run/checkpoints/step-N/`` (format 2).

Layout (every rank writes, fsyncs and hashes its own pieces; rank 0 writes ``checksums.json`` and then
``COMMITTED`` LAST)::

  tables/             torch.distributed.checkpoint (DCP) of every table group's DMP state_dict (ShardedTensor
    .metadata.json    weights) and fused-optimizer state (row-wise Adagrad accumulators); resharded on load. The
    __R_K.distcp      DCP metadata is JSON (``safe_dcp``), never a pickle; the blobs load with weights_only=True
  dense/part-R.pt     full fp32 master weights + AdamW exp_avg / exp_avg_sq of the trainable dense parameters
                      i with i % N == R (N = ranks that wrote it), assembled from the ZeRO partitions (tensors only,
                      loaded with weights_only=True)
  dense/frozen.pt     frozen parameters (rank 0; informational, never loaded)
  dense/scheduler.json  LR scheduler state (JSON)
  rng/rank-R.json     python / numpy / torch (/ cuda) RNG states of rank R (JSON, ``rng_state``)
  state.json          step, data-loader position (global: epoch, sample offset), AdamW step count, early-stopping
                      state, validation history and the running loss window of the log, world size, ZeRO stage, the
                      RunConfig, hash multipliers, SID-table fingerprint, table column layouts
  checksums.json      sha256 and size of every file above (``checkpoint_integrity``), fsynced before COMMITTED
  COMMITTED           written last (fsynced, then the directory); resume only trusts directories that have it

Resume verifies the checksums first (``checkpoint_dirs.choose_resume``): a damaged newest step is reported and the
newest intact committed one is used. Nothing in the directory is unpickled. Format-1 checkpoints (pickled
``.metadata``, ``scheduler.pt``, ``rng/rank-R.pt``, no checksums) are refused with one line.

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
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from comeir_dist.config.base import parse_section
from comeir_dist.errors import UserError
from comeir_dist.train import checkpoint_integrity as integrity
from comeir_dist.train import rng_state
from comeir_dist.train.checkpoint_dirs import (COMMIT, checkpoints_root, latest_committed, retain,  # noqa: F401
                                               retire, set_aside, step_dirs, step_of)
from comeir_dist.train.safe_dcp import METADATA_FILE, JsonMetadataReader, JsonMetadataWriter

log = logging.getLogger(__name__)
FORMAT = 2


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


def save_tables(tables, path: Path) -> list[str]:
    """Collective DCP save with JSON metadata; returns the file names (relative to ``path``) this rank wrote."""
    import torch.distributed.checkpoint as dcp

    flat, _ = _tables_state(tables)
    writer = JsonMetadataWriter(path)
    with _quiet():
        dcp.save(flat, storage_writer=writer)
    return list(writer.written)


def _dcp_reader(path: Path) -> JsonMetadataReader:
    return JsonMetadataReader(str(path))


def read_tables_metadata(path: Path):
    """The DCP ``Metadata`` of a ``tables/`` dir (parsed from JSON); UserError when unreadable."""
    try:
        return _dcp_reader(path).read_metadata()
    except ValueError as exc:
        raise UserError(str(exc)) from None


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
    meta = read_tables_metadata(path).state_dict_metadata
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
        dcp.load(flat, storage_reader=_dcp_reader(path))
        for key, (st, old_cols, new_cols, rows) in converted.items():
            assert isinstance(st, ShardedTensor)
            for shard in st.local_shards():
                j = int(shard.metadata.shard_offsets[0]) // rows
                shard.tensor.copy_(_convert_rowwise(flat[key], rows, old_cols, new_cols, j).to(shard.tensor.dtype))
    return notes


# ---- the whole run state ----------------------------------------------------------------------------------
def _scheduler_json(state: dict) -> str:
    try:
        return json.dumps(state)
    except (TypeError, ValueError) as exc:  # a scheduler whose state is not plain data cannot be stored pickle-free
        raise TypeError(f"LR scheduler state is not JSON-serialisable: {exc}") from None


def save_run_checkpoint(run_dir: Path, step: int, *, env, model, dense, cfg, sampler_state: dict, loop_state: dict,
                        frozen: dict, sid_fingerprint: str) -> Path:
    """Collective: every rank calls it. Returns ``run/checkpoints/step-N``, committed: every file fsynced and listed
    with its sha256 in ``checksums.json`` before ``COMMITTED``. Retention is separate (:func:`retain`)."""
    from comeir_dist.parallel.dist_env import all_gather_object
    from comeir_dist.train.checkpoint_simple import hash_state

    d = checkpoints_root(run_dir) / f"step-{step}"
    if env.is_main:
        if d.exists():  # a partial (or superseded) write of the same step: renamed first, never looks committed again
            shutil.rmtree(retire(d, "deleting"), ignore_errors=True)
        for sub in ("dense", "rng"):
            (d / sub).mkdir(parents=True)
    env.barrier()
    mine: list[str] = []
    has_tables = hasattr(model, "tables")
    if has_tables:
        mine += [f"tables/{name}" for name in save_tables(model.tables, d / "tables")]
    parts = dense.full_state_parts(env.rank, env.world_size)
    torch.save(parts, d / "dense" / f"part-{env.rank:05d}.pt")
    (d / "rng" / f"rank-{env.rank:05d}.json").write_text(json.dumps(rng_state.capture()))
    mine += [f"dense/part-{env.rank:05d}.pt", f"rng/rank-{env.rank:05d}.json"]
    layout = table_layouts(model.tables) if has_tables else {}
    if env.is_main:
        torch.save(frozen, d / "dense" / "frozen.pt")
        (d / "dense" / "scheduler.json").write_text(_scheduler_json(dense.scheduler_state()))
        state = {"format": FORMAT, "step": step, "world_size": env.world_size, "sampler": sampler_state,
                 "loop": loop_state, "optimizer_step": dense.optimizer_step_count(), "zero_stage": dense.stage,
                 "bf16": bool(cfg.train.bf16), "config": cfg.model_dump(mode="json"),
                 "sid_fingerprint": sid_fingerprint, "hash_multipliers": hash_state(model), "table_layout": layout,
                 "dense_parts": env.world_size, "variant": cfg.model.variant}
        (d / "state.json").write_text(json.dumps(state, indent=1))
        mine += ["dense/frozen.pt", "dense/scheduler.json", "state.json"]
    described = integrity.describe(d, mine)  # this rank's files: fsynced, then hashed
    gathered = all_gather_object(described, env)  # also: every rank's files are on disk
    if env.is_main:
        files = {k: v for part in gathered for k, v in part.items()}
        integrity.write_checksums(d, files)
        integrity.durable_write_text(d / COMMIT, str(step))
        integrity.fsync_dir(d.parent)
    env.barrier()
    return d


def required_files(state: dict) -> list[str]:
    """Files a format-2 step dir must list in ``checksums.json`` (from its state.json)."""
    req = ["state.json", "dense/scheduler.json"]
    req += [f"dense/part-{r:05d}.pt" for r in range(int(state["dense_parts"]))]
    req += [f"rng/rank-{r:05d}.json" for r in range(int(state["world_size"]))]
    if state.get("table_layout"):
        req.append(f"tables/{METADATA_FILE}")
    return req


def verify_step(path: Path) -> Optional[str]:
    """None when ``path`` is an intact format-2 step checkpoint, else a one-line problem naming the bad file."""
    path = Path(path)
    problem = integrity.verify(path)
    if problem is not None:
        return problem
    try:
        state = json.loads((path / "state.json").read_text())
        req = required_files(state)
    except (OSError, ValueError, KeyError, TypeError):
        return "state.json: malformed"
    if state.get("format") != FORMAT:
        return f"state.json: format {state.get('format')}, expected {FORMAT}"
    listed = integrity.read_checksums(path) or {}
    missing = [f for f in req if f not in listed]
    return f"{missing[0]}: not listed in {integrity.CHECKSUMS}" if missing else None


def choose_resume(run_dir: Path, resume_from: Optional[Path], resume: Optional[bool]) -> Optional[Path]:
    """See :func:`comeir_dist.train.checkpoint_dirs.choose_resume` (checksums verified by :func:`verify_step`)."""
    from comeir_dist.train.checkpoint_dirs import choose_resume as choose

    return choose(run_dir, resume_from, resume, verify_step, FORMAT)


def read_state(path: Path) -> dict:
    path = Path(path)
    if not (path / COMMIT).is_file():
        raise UserError(f"{path}: not a committed checkpoint (missing {COMMIT})")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / 'state.json'}: unreadable ({exc.__class__.__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path / 'state.json'}: malformed")
    _upgrade_config(state)
    return state


def _upgrade_config(state: dict) -> None:
    """Fields the saved config predates get the behaviour it was trained with (engram.short_keys -> drop)."""
    from comeir_dist.engram.config import upgrade_saved_config

    upgrade_saved_config(state.get("config"))


def check_short_keys(path: Path, saved_config: dict, now_config: dict) -> None:
    """One-line UserError when the checkpoint's Engram keys were built with another ``engram.short_keys``
    rule than the config's (``saved_config`` upgraded: missing = drop)."""
    saved = (saved_config.get("engram") or {}).get("short_keys")
    now = (now_config.get("engram") or {}).get("short_keys")
    if saved is not None and now is not None and saved != now:
        raise UserError(f"{path}: checkpoint was trained with engram.short_keys={saved}, the config says {now}; "
                        f"its Engram rows hold keys of the other rule (set engram.short_keys={saved} to resume, "
                        f"or start a new run dir)")


def check_compatible(path: Path, state: dict, cfg, model, sid_fingerprint: str, n_samples: int) -> None:
    from comeir_dist.train.checkpoint_simple import hash_state

    if state.get("format") != FORMAT:
        raise UserError(f"{path}: checkpoint format {state.get('format')} is not supported (expected {FORMAT}; "
                        f"format 1 stored pickles and is refused)")
    if state["sid_fingerprint"] != sid_fingerprint:
        raise UserError(f"{path}: checkpoint was trained on another SID table")
    if state["hash_multipliers"] != hash_state(model):
        raise UserError(f"{path}: Engram hash multipliers/table sizes differ from the config")
    _upgrade_config(state)  # (idempotent; read_state already did it)
    now = cfg.model_dump(mode="json")
    check_short_keys(path, state["config"], now)
    # validated like any config: options the checkpoint predates take their defaults (every new option defaults to
    # the behaviour before it existed), so upgrading the package does not orphan a run
    saved = parse_section(type(cfg), state["config"], source=f"{path}/state.json").model_dump(mode="json")
    for section in ("model", "engram", "max_history", "seed"):
        if saved.get(section) != now.get(section):
            raise UserError(f"{path}: config '{section}' differs from the checkpoint's; resume needs the same "
                            f"model (start a new run dir or set parallel.resume: false)")
    if state["sampler"]["n"] != n_samples:
        raise UserError(f"{path}: the dataset has {n_samples} training samples, the checkpoint {state['sampler']['n']}")


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc.__class__.__name__})") from None


def _scheduler_state(path: Path, current: dict) -> dict:
    """The saved scheduler state, restricted to the keys the current scheduler has (plain data only)."""
    st = _read_json(path)
    if not isinstance(st, dict) or set(st) - set(current):
        raise UserError(f"{path}: not a scheduler state of this run (keys {sorted(st)[:5] if isinstance(st, dict) else st!r})")
    st["lr_lambdas"] = [None] * len(current.get("lr_lambdas", []))  # functions are never restored from data
    return st


def load_run_checkpoint(path: Path, *, env, model, dense, zero_step) -> dict:
    """Restore tables, dense weights + optimizer, scheduler and RNG; returns the saved state.json.
    Collective: every rank calls it. Verify (:func:`choose_resume` / :func:`verify_step`) and call
    :func:`check_compatible` first. Loads no pickle: JSON, DCP with JSON metadata, ``weights_only`` tensors."""
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
    dense.load_scheduler_state(_scheduler_state(path / "dense" / "scheduler.json", dense.scheduler_state()))
    saved_world = int(state["world_size"])
    if saved_world != env.world_size:
        log.warning("resume: checkpoint written by %d ranks, running on %d: tables resharded, dense weights and "
                    "AdamW moments restored in full, data position continues at global sample %s; rank r uses the "
                    "RNG state of saved rank r mod %d", saved_world, env.world_size, state["sampler"], saved_world)
    rng_path = path / "rng" / f"rank-{env.rank % saved_world:05d}.json"
    try:
        rng_state.restore(_read_json(rng_path))
    except ValueError as exc:
        raise UserError(f"{rng_path}: {exc}") from None
    return state
