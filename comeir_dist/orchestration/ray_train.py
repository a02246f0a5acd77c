"""Run the training loop (:func:`comeir_dist.train.loop.train`, the same one as ``comeir train``) as a Ray Train
``TorchTrainer`` worker group: one worker per rank, the process group made by Ray Train (gloo on CPU, NCCL on
GPUs) and shared by TorchRec and DeepSpeed.

Checkpoints. Every rank writes its part of ``<out>/checkpoints/step-N`` (DCP table shards, DeepSpeed dense +
optimizer parts, RNG) and rank 0 commits it; then every rank calls ``ray.train.report`` and rank 0 attaches a
small *manifest* checkpoint (step, path of the committed step dir, SID fingerprint, world size). Ray Train keeps
the manifests under ``ray.storage_path``; the bulk data stays where the ranks wrote it (copying billions of
table rows into Ray's storage at every checkpoint would double the I/O). On a multi-node cluster ``out`` must
therefore be shared storage, like ``ray.storage_path``. When a worker dies, Ray Train (``FailureConfig
(max_failures)``) restarts the whole group; each new worker reads the last reported manifest
(``ray.train.get_checkpoint()``) and resumes from exactly that step -- on any number of workers.

A recorded manifest path is followed only when it resolves to a ``step-N`` dir under ``<out>/checkpoints``
(anything else is refused with one line); the step dir's checksums are verified before it is loaded.

Each worker appends ``{"event": "start", "run_id", "rank", "pid", "resume_from", "resume_step", "time"}`` to
``<out>/ray_workers.jsonl`` at start (and an ``"error"`` record when training raises), so an operator (or the fault
test) can see the attempts and find a worker's process. ``ray.max_failures: -1`` restarts without limit, except
that a run stops (``comeir_dist.orchestration.attempts``) after a UserError or when the same step failed in two
attempts in a row; the driver then raises (UserError: exit 2; repeated failure: exit 1).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from comeir_dist.config.run import RunConfig
from comeir_dist.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "comeir_checkpoint.json"
WORKERS_LOG = "ray_workers.jsonl"  # written and read by comeir_dist.orchestration.attempts


# ---- driver side -------------------------------------------------------------------------------------------
def _is_uri(p: str) -> bool:
    return "://" in p


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Resolve every path the workers use against the driver's cwd (Ray workers run elsewhere), checking the inputs."""
    def ab(p: Optional[str]) -> Optional[str]:
        return p if p is None or _is_uri(p) else str(Path(p).expanduser().resolve())

    data = Path(ab(cfg.dataset))
    if not data.is_dir():
        raise UserError(f"dataset: {cfg.dataset} not found (resolved to {data}). Under `ray job submit` the working "
                        f"dir is a copy without runs/: pass --dataset with an absolute path every node can read")
    from comeir_dist.train.samples import require_training_samples

    require_training_samples(data)  # before any worker starts (0 samples: the loop would divide by zero)
    upd: dict[str, Any] = {"dataset": str(data), "out": ab(cfg.out)}
    ray_upd = {"storage_path": ab(cfg.ray.storage_path)}
    par_upd = {}
    if cfg.parallel.deepspeed_config:
        from comeir_dist.parallel.memory_plan import DS_CONFIG_DIR

        ds = Path(cfg.parallel.deepspeed_config)
        if not ds.is_file() and (DS_CONFIG_DIR / ds.name).is_file():
            ds = DS_CONFIG_DIR / ds.name
        if not ds.is_file():
            raise UserError(f"parallel.deepspeed_config: {cfg.parallel.deepspeed_config} not found")
        par_upd["deepspeed_config"] = str(ds.resolve())
    bb = cfg.model.backbone
    model = cfg.model
    if bb.path:
        if not Path(bb.path).is_dir():
            raise UserError(f"model.backbone.path: {bb.path} is not a local directory (nothing is downloaded)")
        model = model.model_copy(update={"backbone": bb.model_copy(update={"path": ab(bb.path)})})
    return cfg.model_copy(update={**upd, "model": model, "ray": cfg.ray.model_copy(update=ray_upd),
                                  "parallel": cfg.parallel.model_copy(update=par_upd)})


def resolve_worker_device(cfg: RunConfig) -> RunConfig:
    """Device and backend of the WORKERS from the Ray resources (the driver may have no GPU)."""
    use_gpu = cfg.ray.gpus_per_worker > 0
    if cfg.device == "cuda" and not use_gpu:
        raise UserError("device: cuda needs ray.gpus_per_worker > 0 (--gpus-per-worker)")
    if cfg.device == "cpu" and use_gpu:
        raise UserError("device: cpu with ray.gpus_per_worker > 0; set device: cuda (or auto)")
    device = "cuda" if use_gpu else "cpu"
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_gpu else "gloo")
    if backend == "nccl" and not use_gpu:
        raise UserError("parallel.backend: nccl needs GPU workers (ray.gpus_per_worker > 0)")
    threads = cfg.train.num_threads or max(1, int(cfg.ray.cpus_per_worker))
    return cfg.model_copy(update={"device": device,
                                  "parallel": cfg.parallel.model_copy(update={"backend": backend}),
                                  "train": cfg.train.model_copy(update={"num_threads": threads})})


def preflight_memory_plan(cfg: RunConfig, local: bool) -> None:
    """Refuse a plan that cannot fit before any worker starts. The driver knows the workers' memory only when
    Ray is local (same machine) or ``parallel.device_memory_gib`` says it; otherwise each worker checks it."""
    if not cfg.train.check_memory or not (local or cfg.parallel.device_memory_gib):
        return
    from comeir_dist.quant.embed import load_item_embeddings
    from comeir_dist.train.setup import check_memory_plan

    emb = load_item_embeddings(cfg.dataset)
    if local and cfg.device == "cpu" and cfg.parallel.device_memory_gib is None:
        # all local workers share this host's memory
        import psutil

        per = psutil.virtual_memory().total / 2**30 / cfg.parallel.world_size
        cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"device_memory_gib": per})})
    plan = check_memory_plan(cfg, cfg.parallel.world_size, cfg.device, num_items=len(emb), item_emb_dim=emb.shape[1])
    if plan is not None:
        log.info(plan.message())


def run_ray_train(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Fit the TorchTrainer; returns {"run_dir", "summary", "ray_checkpoint", "attempts"}. Starts a local Ray
    (``ray.local_num_cpus``) unless ``ray.address`` / RAY_ADDRESS points at a cluster."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from comeir_dist.orchestration.ray_session import ray_session

    cfg = resolve_worker_device(absolute_paths(cfg))
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if cfg.ray.placement_strategy == "STRICT_SPREAD" and cfg.parallel.world_size > 1 and address in (None, "", "local"):
        raise UserError(f"ray.placement_strategy STRICT_SPREAD puts each of the {cfg.parallel.world_size} workers on "
                        f"its own node; a local Ray instance is one node (use PACK, or join a cluster)")
    preflight_memory_plan(cfg, local=not address)
    from comeir_dist.utils.output_guard import claim_out_dir, run_fingerprint

    # before any worker starts: refuse an out dir holding other content unless overwrite (workers see the marker)
    claim_out_dir(cfg.out, "run", run_fingerprint(cfg), "comeir train (Ray Train)", overwrite=overwrite)
    rc, world = cfg.ray, cfg.parallel.world_size
    resources = {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker} if rc.gpus_per_worker else {})}
    name = rc.run_name(cfg.out)  # default: basename of out + hash of its absolute path (no collisions)
    with ray_session(address, rc.local_num_cpus, dashboard=True):
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        if rc.cpus_per_worker * world > cluster_cpus:
            raise UserError(f"parallel.world_size {world} x ray.cpus_per_worker {rc.cpus_per_worker:g} CPUs > the "
                            f"cluster's {cluster_cpus:g}; lower --num-workers or --cpus-per-worker")
        if rc.placement_strategy == "STRICT_SPREAD" and world > 1:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            if nodes < world:
                log.warning("ray.placement_strategy STRICT_SPREAD: %d worker(s) need %d nodes, the cluster has %d "
                            "alive; the run waits until enough nodes have joined", world, world, nodes)
        run_id = uuid.uuid4().hex  # scopes the attempt records of this fit (attempts.py)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"run": cfg.model_dump(mode="json"), "run_id": run_id},
            scaling_config=ScalingConfig(num_workers=world, use_gpu=rc.gpus_per_worker > 0,
                                         resources_per_worker=resources, placement_strategy=rc.placement_strategy),
            torch_config=TorchConfig(backend=cfg.parallel.backend, timeout_s=1800),
            run_config=RayRunConfig(name=name, storage_path=rc.storage_path,
                                    failure_config=FailureConfig(max_failures=rc.max_failures),
                                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.parallel.keep_checkpoints)))
        log.info("Ray Train: %d worker(s) x %s (%s), backend %s, storage %s/%s, max_failures %d", world, resources,
                 rc.placement_strategy, cfg.parallel.backend, rc.storage_path, name, rc.max_failures)
        try:
            result = trainer.fit()
        except Exception as exc:  # TrainingFailedError wraps the worker's exception
            raise_if_stopped(Path(cfg.out), run_id, name)
            raise RuntimeError(f"Ray Train run {name} failed: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
                               ) from exc
    raise_if_stopped(Path(cfg.out), run_id, name)
    out = Path(cfg.out)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return {"run_dir": str(out), "summary": summary,
            "ray_checkpoint": None if result.checkpoint is None else result.checkpoint.path,
            "attempts": worker_attempts(out, run_id)}


def worker_attempts(out: Path, run_id: Optional[str] = None) -> list[dict]:
    """The workers' start records (all runs, or one ``run_id``); a torn last line is skipped."""
    from comeir_dist.orchestration import attempts

    return attempts.records(out, run_id)


def raise_if_stopped(out: Path, run_id: str, name: str) -> None:
    """After ``fit``: the workers stopped the run (attempts.py) -> UserError (its message) or RuntimeError."""
    from comeir_dist.orchestration import attempts

    st = attempts.stopped(out, run_id)
    if st is None:
        return
    if st.get("reason") == "user_error":
        raise UserError(str(st.get("message")))
    raise RuntimeError(f"Ray Train run {name} stopped: {st.get('message')}")


# ---- worker side -------------------------------------------------------------------------------------------
def manifest_step_dir(manifest, out: Path) -> Optional[Path]:
    """The step dir a reported manifest names, refused (UserError) unless it is ``<out>/checkpoints/step-N``."""
    from comeir_dist.train.checkpoint_dirs import require_step_dir

    if not isinstance(manifest, dict):
        raise UserError(f"Ray Train checkpoint manifest {MANIFEST}: malformed")
    path = manifest.get("path")
    return None if path is None else require_step_dir(out, path, f"Ray Train checkpoint manifest {MANIFEST}")


def _manifest_resume(out: Path) -> Optional[Path]:
    """The committed step dir of the last checkpoint reported to Ray Train (None on the first attempt)."""
    import ray.train

    ck = ray.train.get_checkpoint()
    if ck is None:
        return None
    with ck.as_directory() as d:
        try:
            m = json.loads((Path(d) / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"Ray Train checkpoint {ck.path}: {MANIFEST} unreadable ({exc.__class__.__name__})") from None
    return manifest_step_dir(m, out)


def _report(step: int, step_dir: Optional[Path], metrics: dict, name: str = "step") -> None:
    """Every rank reports (Ray Train synchronises on it); rank 0 attaches the manifest checkpoint."""
    import ray.train

    ctx = ray.train.get_context()
    tmp = None
    ck = None
    if ctx.get_world_rank() == 0:
        tmp = tempfile.mkdtemp(prefix="comeir-manifest-")
        manifest = {"step": step, "path": None if step_dir is None else str(step_dir),
                    "world_size": ctx.get_world_size(), "sid_fingerprint": metrics.get("sid_fingerprint"),
                    "time": time.time()}
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=1))
        ck = ray.train.Checkpoint.from_directory(tmp)
    try:
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=ck,
                         checkpoint_dir_name=f"{name}-{step:08d}" if ck is not None else None)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def train_worker(config: dict) -> None:
    """The Ray Train worker function: the same ``train(cfg)`` as ``comeir train``, resumed from Ray's checkpoint."""
    run_attempt(config, _train_and_report)


def _train_and_report(cfg: RunConfig, resume_from: Optional[Path]) -> None:
    from comeir_dist.train.checkpoint import latest_committed
    from comeir_dist.train.loop import train

    out = Path(cfg.out)
    train(cfg, on_checkpoint=_report, resume_from=resume_from)
    summary = out / "summary.json"
    final = json.loads(summary.read_text()) if summary.is_file() else {}
    _report(int(final.get("steps", 0)), latest_committed(out),  # a restart after this resumes at the end
            {"final": 1, "steps": final.get("steps", 0), "best_valid_ndcg@10": final.get("best_valid_ndcg@10", -1.0)}, name="final")


def run_attempt(config: dict, body) -> None:
    """One worker's attempt (see ``attempts``): return at once when an earlier attempt stopped this run; else record
    the start and run ``body(cfg, resume_from)``. A failure is recorded; a UserError, or the same resume step
    failing for the second time in a row, stops the run (the record is written before the error propagates)."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("comeir_dist").setLevel(logging.INFO)
    import ray.train

    from comeir_dist.orchestration import attempts
    from comeir_dist.train.checkpoint_dirs import step_of

    cfg = RunConfig.model_validate(config["run"])
    run_id = str(config.get("run_id") or "unscoped")
    rank = ray.train.get_context().get_world_rank()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if attempts.stopped(out, run_id):
        log.error("rank %d: this Ray Train run was stopped by an earlier attempt (%s); not training", rank,
                  out / attempts.STOPPED)
        return
    resume_step = 0
    try:
        resume_from = _manifest_resume(out)
        resume_step = 0 if resume_from is None else step_of(resume_from)
        if attempts.repeated_failure(attempts.records(out, run_id, rank), resume_step):  # crashes left no record
            _stop(out, run_id, rank, resume_step, None)
            raise RuntimeError(f"stopping the run: step {resume_step} failed in {attempts.FAILS_IN_A_ROW} attempts "
                               f"in a row")
        if resume_from is not None:
            cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"resume": True})})
        attempts.record_start(out, run_id, rank, resume_from, resume_step)
        log.info("Ray Train worker rank %d pid %d%s", rank, os.getpid(),
                 f", resuming from {resume_from}" if resume_from else "")
        body(cfg, resume_from)
    except UserError as exc:
        attempts.record_error(out, run_id, rank, resume_step, exc)
        attempts.write_stopped(out, run_id, "user_error", resume_step, str(exc))
        raise
    except BaseException as exc:
        if not attempts.stopped(out, run_id):
            attempts.record_error(out, run_id, rank, resume_step, exc)
            if attempts.repeated_failure(attempts.records(out, run_id, rank), resume_step):
                _stop(out, run_id, rank, resume_step, attempts.one_line(exc))
        raise


def _stop(out: Path, run_id: str, rank: int, step: int, error: Optional[str]) -> None:
    """Record that this run must not be restarted again (the next attempt returns at once; the driver reports it)."""
    from comeir_dist.orchestration import attempts

    msg = (f"step {step} failed in {attempts.FAILS_IN_A_ROW} attempts in a row (last error: "
           f"{error or attempts.last_error(out, run_id) or 'unknown, see the worker logs'}); not restarting again -- "
           f"fix the cause and rerun (it resumes from step {step})")
    log.error("rank %d: %s", rank, msg)
    attempts.write_stopped(out, run_id, "repeated_failure", step, msg)
