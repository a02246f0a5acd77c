"""The process group of a run: one group serves TorchRec (Engram tables) and DeepSpeed (dense part).

:func:`init_distributed` covers the three ways a training function is started:

* already inside an initialised process group (Ray Train worker, a test harness): use it as is;
* under ``torchrun`` (``WORLD_SIZE``/``RANK``/``MASTER_ADDR`` set, no group yet): ``env://`` init;
* a plain single process (``comeir train``): a world-size-1 group on a free localhost port.

Only a group created here is destroyed by :meth:`DistEnv.shutdown`; the single-process group is kept
for the life of the process (``comeir experiment`` trains several models in one process).
Device: ``cuda:<LOCAL_RANK>`` with NCCL when CUDA is requested/available, else CPU with gloo.

This module is the place that turns a configured device (``auto | cpu | cuda``) and backend
(``auto | gloo | nccl``) into a ``torch.device`` / backend name: :func:`select_device` and
:func:`resolve_backend` only ask ``torch.cuda.is_available()`` / ``device_count()`` (no device is set);
:func:`resolve_device` adds ``torch.cuda.set_device``. ``train.setup.resolve_device`` (evaluation), the
benchmarks, ``quant.embed`` and ``entrypoint`` (the DS_ACCELERATOR default) call into here. Not yet:
``parallel.memory_plan.resolve_device`` (a str for the plan), ``orchestration.ray_train.resolve_worker_device``
(device from the Ray GPU request) and the backend choice of ``parallel.sparse`` / ``parallel.engram_tables``
when they create a group themselves (tests/unit/test_device_paths.py lists them).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from comeir_dist.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    created: bool  # this module created the group (and may destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pg(self):
        return dist.group.WORLD

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the group if it was created by :func:`init_distributed` for a multi-rank launch."""
        if self.created and self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")


def cuda_device_count() -> int:
    """Visible CUDA devices (after ``CUDA_VISIBLE_DEVICES``); 0 without a usable CUDA build or driver."""
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def local_rank_from_env() -> int:
    """``LOCAL_RANK`` (set by torchrun, Ray Train and DeepSpeed launchers); 0 when unset."""
    raw = os.environ.get("LOCAL_RANK", "0").strip() or "0"
    try:
        rank = int(raw)
    except ValueError:
        raise UserError(f"LOCAL_RANK={raw!r}: must be a non-negative integer") from None
    if rank < 0:
        raise UserError(f"LOCAL_RANK={raw!r}: must be a non-negative integer")
    return rank


def select_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device a configured ``name`` means on this process, without touching CUDA state.

    ``auto``: ``cuda`` when a CUDA device is visible, else ``cpu``. ``cuda``: ``cuda:<local_rank mod visible
    devices>`` (one process per GPU under torchrun / Ray Train; a process that sees one GPU gets index 0), a
    one-line UserError when no CUDA device is visible. ``local_rank`` None = ``LOCAL_RANK`` of the environment."""
    if name not in DEVICES:
        raise UserError(f"device: {name!r}; allowed values: {', '.join(DEVICES)}")
    count = cuda_device_count()
    if name == "auto":
        name = "cuda" if count else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not count:
        raise UserError("device: 'cuda' requested but no CUDA device is available (use 'cpu' or 'auto')")
    rank = local_rank_from_env() if local_rank is None else int(local_rank)
    if rank >= count > 1:
        log.warning("LOCAL_RANK %d but only %d CUDA devices are visible: ranks share cuda:%d", rank, count,
                    rank % count)
    return torch.device("cuda", rank % count)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """:func:`select_device`, and make a CUDA device the current one (``torch.cuda.set_device``)."""
    dev = select_device(name, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def resolve_backend(backend: str, device: torch.device) -> str:
    """Process-group backend for ``device``: ``auto`` = nccl on CUDA, gloo on CPU; nccl on CPU is an error."""
    if backend not in BACKENDS:
        raise UserError(f"parallel.backend: {backend!r}; allowed values: {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("parallel.backend: 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    return backend


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Join (or create) the default process group and pick this rank's device. See the module docstring."""
    local_rank = local_rank_from_env()
    dev = resolve_device(device, local_rank)
    created = False
    if not dist.is_initialized():
        be = resolve_backend(backend, dev)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
            dist.init_process_group(be, init_method="env://", timeout=timedelta(seconds=timeout_s))
        else:
            port = _free_port()
            dist.init_process_group(be, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
        created = True
    be = dist.get_backend()
    if dev.type == "cuda" and be != "nccl":
        log.warning("process group backend is %s on CUDA devices (nccl is faster)", be)
    if dev.type == "cpu" and be == "nccl":
        raise UserError("the process group uses nccl but the run's device is cpu (set device: cuda)")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed requires it
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                   backend=be, created=created)


# ---- small collectives (no-ops at world size 1) ------------------------------------------------------
def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if env.world_size == 1:
        return [float(v) for v in values]
    # gloo reduces host tensors, nccl device tensors
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.backend == "nccl" else torch.device("cpu"))
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
