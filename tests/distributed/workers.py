"""Functions the distributed tests run on every rank (spawned by ``harness.run_ranks``; must be importable)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

K = 3  # steps per half run; full runs have 2K steps and a step checkpoint every K
# per sharding: (global batch, validation users, eval batch) chosen so the 2-rank runs hit an uneven split
# of a global batch (13 -> last batch of 7 = 4 + 3), a rank without samples (71 -> second batch of 1) and
# uneven / padded validation slices (11 users in batches of 5 -> 2 and 1 batches per rank).
SHAPES = {"table_wise": (13, 11, 5), "row_wise": (71, 16, 16), "column_wise": (32, 11, 5)}


def run_config(ds: str, out: str, sharding: str, world: int, train: dict | None = None, variant: str = "comeir",
               **parallel):
    from tests.fixtures import tiny_run_config

    batch, users, eval_batch = SHAPES[sharding]
    t = {"max_steps": 2 * K, "eval_every": 2 * K, "log_every": 1, "eval_users": users, "batch_size": batch}
    cfg = tiny_run_config(Path(ds), Path(out), variant=variant, **{**t, **(train or {})})
    cfg.eval.batch_size = eval_batch
    p = cfg.parallel
    p.sharding, p.world_size, p.checkpoint_every, p.keep_checkpoints = sharding, world, K, 2
    p.column_shards = 2 if sharding == "column_wise" else None
    for k, v in parallel.items():
        setattr(p, k, v)
    return cfg


def copy_until(src: Path, dst: Path, step: int, partial_step: int | None = None) -> None:
    """Copy a run dir keeping only checkpoints <= step (the state of a run interrupted after ``step``);
    optionally add a half-written checkpoint dir (no COMMITTED) at ``partial_step``."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    if partial_step is not None:
        part = dst / "checkpoints" / f"step-{partial_step}"
        (part / "tables").mkdir(parents=True)
        (part / "tables" / "junk.distcp").write_bytes(b"half written")


def train_jobs(rank: int, world: int, jobs: list[dict], then=None) -> None:
    """Run ``train`` for each job {ds, out, sharding, parallel: {...}, train: {...}, engram: {...},
    copy: {src, step, partial}};
    then ``then = (function, args)`` if given (one process launch for several steps: imports dominate)."""
    import torch.distributed as dist

    from comeir_dist.train.loop import train

    for job in jobs:
        if "copy" in job:
            if rank == 0:
                c = job["copy"]
                copy_until(Path(c["src"]), Path(job["out"]), c["step"], c.get("partial"))
            dist.barrier()
        cfg = run_config(job["ds"], job["out"], job["sharding"], world, train=job.get("train"),
                         variant=job.get("model", {}).get("variant", "comeir"), **job.get("parallel", {}))
        for k, v in job.get("engram", {}).items():
            setattr(cfg.engram, k, v)
        train(cfg)
    if then is not None:
        then[0](rank, world, *then[1])


def check_column_conversion(rank: int, world: int, ds: str, ckpt: str, out_json: str) -> None:
    """Load a 2-column-shard checkpoint into 1 column shard per table; record saved vs loaded row-wise state."""
    import torch
    import torch.distributed.checkpoint as dcp

    from comeir_dist.parallel.engram_tables import group_dmps
    from comeir_dist.parallel.sparse import _assemble
    from comeir_dist.train.checkpoint import load_tables, read_state
    from comeir_dist.train.setup import build_sharded_model, load_inputs

    cfg = run_config(ds, str(Path(out_json).parent / "unused"), "column_wise", world, column_shards=None)
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, torch.device("cpu"), plan="column_wise")
    state = read_state(Path(ckpt))
    notes = load_tables(model.tables, Path(ckpt) / "tables", state["table_layout"])
    from comeir_dist.train.safe_dcp import JsonMetadataReader

    meta = JsonMetadataReader(str(Path(ckpt) / "tables")).read_metadata().state_dict_metadata
    saved = {k: torch.zeros(tuple(v.size), dtype=v.properties.dtype) for k, v in meta.items()}
    dcp.load(saved, storage_reader=JsonMetadataReader(str(Path(ckpt) / "tables")), no_dist=True)
    worst_momentum, worst_weight, n = 0.0, 0.0, 0
    for g, dmp in group_dmps(model.tables).items():
        weights = _assemble(dmp.state_dict())
        for k, w in weights.items():
            worst_weight = max(worst_weight, float((w - saved[f"{g}/weight/{k}"]).abs().max()))
        for pk, st in dmp.fused_optimizer.state_dict()["state"].items():
            for sk, v in st.items():
                got = _assemble({"m": v})["m"]
                old = saved[f"{g}/optim/{pk}/{sk}"]
                rows = got.shape[0]
                expect = old.reshape(-1, rows).mean(0)  # 2 equal-width shards -> mean of the two statistics
                worst_momentum = max(worst_momentum, float((got - expect).abs().max()))
                n += 1
    if rank == 0:
        Path(out_json).write_text(json.dumps({"notes": notes, "momentum_err": worst_momentum,
                                              "weight_err": worst_weight, "states": n}))


def record_table_placement(rank: int, world: int, ds: str, out_json: str) -> None:
    """Shard the tiny model's tables table-wise on this world and write {table: ranks} (rank 0)."""
    from comeir_dist.parallel.engram_tables import group_dmps
    from comeir_dist.parallel.sparse import describe_plan
    from comeir_dist.train.setup import build_sharded_model, load_inputs

    cfg = run_config(ds, out_json + ".run", "table_wise", world)
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, torch_device(), plan="table_wise")
    placement = {}
    for dmp in group_dmps(model.tables).values():
        placement.update({name: d["ranks"] for name, d in describe_plan(dmp).items()})
    if rank == 0:
        Path(out_json).write_text(json.dumps(placement))


def torch_device():
    import torch

    return torch.device("cpu")


def damage(run: Path, ops: list[dict]) -> None:
    """Break a copied run dir like a crash or a bad disk would: {"torn_log": text} appends a torn line to
    train_log.jsonl, {"truncate": rel, "step": N} cuts a file of step-N to 16 bytes, {"flip": rel, "step": N} flips
    one bit in the middle of it."""
    for op in ops:
        if "torn_log" in op:
            with (run / "train_log.jsonl").open("a") as f:
                f.write(op["torn_log"])
            continue
        rel = op.get("truncate") or op.get("flip")
        p = run / "checkpoints" / f"step-{op['step']}" / rel
        data = bytearray(p.read_bytes())
        if "truncate" in op:
            p.write_bytes(bytes(data[:16]))
        else:
            data[len(data) // 2] ^= 0x04
            p.write_bytes(bytes(data))


def record_reports(out_json: str):
    """An ``on_checkpoint`` that records, at each report, the committed steps on disk (rank 0)."""
    import torch.distributed as dist

    def on_checkpoint(step, step_dir, metrics):
        from comeir_dist.train.checkpoint import step_dirs

        if dist.get_rank() == 0:
            p = Path(out_json)
            seen = json.loads(p.read_text()) if p.is_file() else []
            seen.append({"step": step, "on_disk": [s for s, _, ok in step_dirs(step_dir.parent.parent) if ok]})
            p.write_text(json.dumps(seen))
    return on_checkpoint


def recovery_jobs(rank: int, world: int, jobs: list[dict]) -> None:
    """Like :func:`train_jobs`, plus per job: "model" / "backbone" overrides, "damage" ops applied (rank 0) after
    the copy, "reports": a JSON file for :func:`record_reports`."""
    import torch.distributed as dist

    from comeir_dist.train.loop import train

    for job in jobs:
        if "copy" in job:
            if rank == 0:
                c = job["copy"]
                copy_until(Path(c["src"]), Path(job["out"]), c["step"])
                damage(Path(job["out"]), job.get("damage", []))
            dist.barrier()
        cfg = run_config(job["ds"], job["out"], job["sharding"], world, train=job.get("train"),
                         variant=job.get("model", {}).get("variant", "comeir"), **job.get("parallel", {}))
        for k, v in job.get("model", {}).items():
            setattr(cfg.model, k, v)
        for k, v in job.get("backbone", {}).items():
            setattr(cfg.model.backbone, k, v)
        train(cfg, on_checkpoint=record_reports(job["reports"]) if "reports" in job else None)
