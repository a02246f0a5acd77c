"""Multi-process test harness (torchrec style): N spawned CPU processes in one gloo group on a free port.

``run_ranks(world, fn, *args)`` starts ``world`` processes, each initialises the default process group
(``tcp://127.0.0.1:<free port>``), runs ``fn(rank, world, *args)``, destroys the group and exits. A
failure on any rank raises with that rank's traceback; a hang is killed after ``timeout`` seconds.
``fn`` must be importable (module-level function) because the processes are started fresh: forked from a
forkserver that has imported torch, TorchRec, DeepSpeed, transformers and the training loop once
(``tests.distributed.preload``), so a launch does not pay those imports again in every rank process. Each rank
runs with the launching process's environment of the moment (plus ``CHILD_ENV``), as a spawned one would.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback

CHILD_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, errors, environ: dict) -> None:
    os.environ.clear()  # the launching process's environment now (the forkserver's is the one of its start)
    os.environ.update(environ)
    os.environ.update(CHILD_ENV)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import logging

    import torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """The forkserver start method with the heavy imports preloaded (the preload takes effect when the forkserver
    starts, i.e. at the first launch of this process)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.distributed.preload"])
    return ctx


def run_ranks(world: int, fn, *args, timeout: float = 300) -> None:
    ctx = _context()
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errors, dict(os.environ)), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in hung:
        procs[i].kill()
        procs[i].join(5)
    msgs = []
    while True:
        try:
            msgs.append(errors.get(timeout=0.5))
        except queue.Empty:
            break
    if msgs:
        r, tb = sorted(msgs)[0]
        raise AssertionError(f"rank {r} failed:\n{tb}")
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout}s (deadlock?)")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with codes {bad}")
