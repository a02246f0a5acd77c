"""The dense part of a model under one DeepSpeed ZeRO engine; the Engram tables never enter it.

Everything ``train.setup.dense_parameters`` returns (backbone, W_E, scoring, gates, merge, head) trains
with a client ``torch.optim.AdamW`` (``train.lr`` / ``train.weight_decay``), warm-up + cosine LR
(a client ``LambdaLR`` stepped by ``engine.step()``), gradient clipping ``train.grad_clip`` and, with
``train.bf16``, DeepSpeed bf16 (bf16 weights, fp32 master weights and moments) plus bf16 autocast.
The sparse tables are attached outside the module tree (``EngramTables.attach``), so neither
``deepspeed.initialize`` nor ZeRO partitioning ever sees them; their fused row-wise Adagrad runs inside
the same ``engine.backward(loss)``.

World-size-independent dense state (used by run checkpoints, see ``train.checkpoint``):
:meth:`DenseEngine.full_state_parts` returns, per trainable parameter, the full fp32 master weight and
the full AdamW moments ``exp_avg`` / ``exp_avg_sq`` assembled from the ZeRO partitions with DeepSpeed's
tensor-fragment API (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``; the ZeRO-1/2 fragments of
many parameters in one bucketed all-reduce), plus the AdamW
step count. :meth:`DenseEngine.load_full_state` writes such a state back into ANY world size and ZeRO
stage (``safe_set_full_*``), so a resume on M ranks continues the optimizer exactly where N ranks left it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from comeir_dist.errors import UserError
from comeir_dist.train.schedule import PlateauScale, lr_factor

log = logging.getLogger(__name__)
MOMENTS = ("exp_avg", "exp_avg_sq")
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
GATHER_BUCKET_NUMEL = 1 << 25  # fp32 values (128 MB) per all-reduce when assembling full ZeRO-1/2 state


def prepare_deepspeed(device: torch.device):
    """Import deepspeed with the accelerator of the training device (DS_ACCELERATOR=cpu / cuda, set before
    the import: DeepSpeed fixes its accelerator on first use, and a stale value inherited from a CPU-only
    driver or head node must not put GPU workers on the CPU accelerator).

    On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (g++/ninja, 0.5-2.5 min on first use)
    when its comm backend starts. Only DeepSpeed *inference* (tensor-parallel layers) uses that op, and it
    falls back to the process group without it, so training skips the build unless
    ``COMEIR_DS_SHM_COMM=1``."""
    if device.type in ("cpu", "cuda"):
        os.environ["DS_ACCELERATOR"] = device.type
    import deepspeed

    if device.type == "cpu" and os.environ.get("COMEIR_DS_SHM_COMM", "0") != "1":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(cfg, per_rank_batch: int, world: int) -> dict:
    """The DeepSpeed config dict: ``parallel.deepspeed_config`` (a JSON file; its ZeRO stage wins) or
    ``configs/deepspeed/zero<parallel.zero_stage>.json`` (bare ``{"stage": N}`` if that file is not there),
    with the batch, clipping and bf16 settings always taken from the run config. ``per_rank_batch`` is one
    rank's micro-batch (``train.grad_accum_steps`` of them per optimizer step)."""
    p = cfg.parallel
    path = None
    if p.deepspeed_config:
        path = Path(p.deepspeed_config)
        if not path.is_file() and (DS_CONFIG_DIR / path.name).is_file():
            path = DS_CONFIG_DIR / path.name
        if not path.is_file():
            raise UserError(f"parallel.deepspeed_config: {p.deepspeed_config} not found")
    elif (DS_CONFIG_DIR / f"zero{p.zero_stage}.json").is_file():
        path = DS_CONFIG_DIR / f"zero{p.zero_stage}.json"
    if path is not None:
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: malformed JSON: {exc.msg}") from None
        for key in ("optimizer", "scheduler", "fp16"):
            if key in ds:
                raise UserError(f"{path}: remove '{key}': the optimizer (AdamW), LR schedule and precision "
                                f"come from the run config (train.lr, train.bf16)")
    else:
        ds = {"zero_optimization": {"stage": p.zero_stage}}
    ds.setdefault("zero_optimization", {}).setdefault("stage", p.zero_stage)
    gas = cfg.train.grad_accum_steps
    ds.update({"train_micro_batch_size_per_gpu": per_rank_batch, "gradient_accumulation_steps": gas,
               "train_batch_size": per_rank_batch * gas * world, "gradient_clipping": cfg.train.grad_clip,
               "bf16": {"enabled": bool(cfg.train.bf16)}})
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def sid_training_loss(model: nn.Module, batch, bf16: bool = False) -> torch.Tensor:
    """The SID models' objective (Eq. 12): teacher-forced level logits (bf16 autocast when training in bf16) and
    the catalog-constrained token cross-entropy (in fp32, outside the autocast); a ``[B, N]`` target is an
    all-position window (``train.sample_mode: sequence``: the model's ``sequence_training_loss``)."""
    from comeir_dist.model.history import HistoryBatch
    from comeir_dist.model.loss import constrained_sid_loss

    if batch.target.dim() == 2:  # train.sample_mode: sequence: every position of a window
        return model.sequence_training_loss(batch, bf16)
    target_codes = model.catalog.item_codes(batch.target)
    with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model.level_logits(HistoryBatch(batch.items, batch.target), target_codes)
    return constrained_sid_loss(logits, target_codes, model.trie)


def training_loss(model: nn.Module, batch, bf16: bool = False) -> torch.Tensor:
    """Mean training loss of ``model`` on ``batch`` (a ``HistoryBatch`` with targets): the model's own
    ``training_loss(batch, bf16=...)`` when it defines one (sasrec: cross-entropy over all items), else the SID
    objective :func:`sid_training_loss` (comeir / flatten / tm)."""
    own = getattr(model, "training_loss", None)
    return own(batch, bf16=bf16) if callable(own) else sid_training_loss(model, batch, bf16)


class TrainForward(nn.Module):
    """What the engine runs: the training loss of ``model`` on a batch (mean over the rank's samples)."""

    def __init__(self, model: nn.Module, bf16: bool):
        super().__init__()
        self.model = model
        self.bf16 = bf16

    def forward(self, items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from comeir_dist.model.history import HistoryBatch

        return training_loss(self.model, HistoryBatch(items, target), self.bf16)


def _base_optimizer(opt):
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__module__.startswith("deepspeed"):
        if not hasattr(opt, "optimizer"):
            break
        opt = opt.optimizer
    return opt


class DenseEngine:
    """``deepspeed.initialize`` over every dense parameter of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg, device: torch.device, world: int, per_rank_batch: int,
                 dense_params: list[nn.Parameter]):
        deepspeed = prepare_deepspeed(device)
        self.model, self.cfg, self.device = model, cfg, device
        self.config = deepspeed_config(cfg, per_rank_batch, world)
        self.stage = int(self.config["zero_optimization"]["stage"])
        tc = cfg.train
        if tc.bf16 and self.stage == 0:
            raise UserError("train.bf16 needs DeepSpeed ZeRO stage >= 1 (parallel.zero_stage)")
        self.forward_module = TrainForward(model, tc.bf16)
        optimizer = torch.optim.AdamW(dense_params, lr=tc.lr, weight_decay=tc.weight_decay)
        warm, total = tc.warmup_steps, tc.max_steps
        # the plateau scale is shared with the loop (it also scales the sparse Adagrad rate); see train.schedule
        self.plateau = PlateauScale(tc.lr_schedule, tc.plateau_factor)

        def schedule(opt):
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_factor(s, warm, total, tc.lr_schedule, self.plateau.scale))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.forward_module, optimizer=optimizer, lr_scheduler=schedule, config=self.config,
            dist_init_required=False)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._params = dict(model.named_parameters())
        self.steps_done = 0  # optimizer steps since initialisation or the loaded state

    # ---- training -------------------------------------------------------------------------------------
    def loss(self, items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.engine(items, target)

    @property
    def accum_steps(self) -> int:
        return int(self.config["gradient_accumulation_steps"])

    def backward_step(self, loss: torch.Tensor) -> bool:
        """One micro-batch: ``engine.backward`` (dense gradients accumulate, scaled by 1/accum_steps; the fused
        table updates apply now) and ``engine.step`` (AdamW + LR schedule only at the accumulation boundary).
        Returns whether the optimizer stepped."""
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        self.engine.backward(loss)
        self.engine.step()
        self.steps_done += int(boundary)
        return boundary

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @contextlib.contextmanager
    def inference(self) -> Iterator[nn.Module]:
        """The plain model for validation / checkpoint export: eval mode, full parameters (gathered under
        ZeRO-3), bf16 autocast when training in bf16."""
        gather = contextlib.nullcontext()
        if self.stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        with gather, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg.train.bf16)):
            yield self.model

    # ---- world-size-independent state ---------------------------------------------------------------------
    def _full(self, name: str, key: str | None) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        p = self._params[name]
        v = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        if v is None:  # no ZeRO / no mixed precision: the client optimizer holds the parameter itself
            if key is None:
                v = p.detach()
            else:
                st = _base_optimizer(self.optimizer).state.get(p, {})
                v = st.get(key)
        return None if v is None else v.detach().float().cpu().clone()

    def optimizer_step_count(self) -> int:
        for st in _base_optimizer(self.optimizer).state.values():
            if "step" in st:
                return int(float(st["step"]))
        return 0

    def _full_many(self, names: list[str], key: str | None, keep: set[str] | None = None) -> dict:
        """:meth:`_full` of the parameters ``names`` (those in ``keep``, default all, are returned). ZeRO-1/2 (and bf16)
        parameters are assembled from their fragments by one all-reduce per bucket of up to ``GATHER_BUCKET_NUMEL``
        values instead of one per parameter: the same values (each element is held by exactly one rank, the others
        add zeros), a few collectives instead of hundreds. Collective: every rank calls it with the same names."""
        from deepspeed import comm as dist

        keep = set(names) if keep is None else keep
        out: dict = {}
        buckets: list[tuple[object, list[str], int]] = []  # (dp group, names, values), in parameter order
        for n in names:
            p = self._params[n]
            if not hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):  # no ZeRO / ZeRO-3: one at a time
                v = self._full(n, key)
                if n in keep:
                    out[n] = v
                continue
            if not buckets or buckets[-1][0] is not p._dp_group or buckets[-1][2] + p.numel() > GATHER_BUCKET_NUMEL:
                buckets.append((p._dp_group, [], 0))
            group, members, size = buckets[-1]
            members.append(n)
            buckets[-1] = (group, members, size + p.numel())
        for group, members, size in buckets:
            buf = torch.zeros(size, dtype=torch.float32, device=self._params[members[0]].device)
            offsets, off = {}, 0
            for n in members:
                p = self._params[n]
                offsets[n] = off
                if p._hp_mapping is not None:  # this rank's fragment of the parameter (as in get_full_hp_param)
                    addr = p._hp_mapping.lp_fragment_address
                    buf.narrow(0, off + addr.start, addr.numel).copy_(p._hp_mapping.get_hp_fragment(key).data)
                off += p.numel()
            dist.all_reduce(buf, group=group)
            for n in members:
                if n in keep:
                    p = self._params[n]
                    out[n] = buf.narrow(0, offsets[n], p.numel()).view(p.shape).float().cpu().clone()
        return {n: out[n] for n in names if n in keep}

    def full_state_parts(self, rank: int, world: int, with_optimizer: bool = True) -> dict:
        """Full fp32 weights (+ AdamW moments) of the trainable parameters ``i`` with ``i % world == rank``.
        Collective: every rank must call it (the parameters are assembled by all-reduces)."""
        out: dict = {"params": {}, **{k: {} for k in MOMENTS}}
        have_opt = with_optimizer and self.optimizer_step_count() > 0
        mine = {name for i, name in enumerate(self.names) if i % world == rank}
        for key in ((None,) + (MOMENTS if have_opt else ())):
            out["params" if key is None else key] = self._full_many(self.names, key, mine)
        return out

    def full_weights(self) -> dict[str, torch.Tensor]:
        """All trainable fp32 master weights on every rank (collective). For small models / best/ export."""
        return self._full_many(self.names, None)

    def load_full_state(self, params: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]] | None,
                        opt_step: int, zero_step: Callable[[], None]) -> None:
        """Restore fp32 master weights, model weights, AdamW moments and step count from a full state.

        ``zero_step`` runs one optimizer step (all its micro-batches) with a zero loss; with lr=0 it makes DeepSpeed
        create (and link) the optimizer state without changing any weight, table row or moment."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        missing = [n for n in self.names if n not in params]
        if missing:
            raise UserError(f"checkpoint lacks dense parameters {missing[:3]} (model config changed?)")
        base = _base_optimizer(self.optimizer)
        if moments and opt_step > 0:
            lrs = [g["lr"] for g in base.param_groups]
            for g in base.param_groups:
                g["lr"] = 0.0
            sched_state = self.scheduler.state_dict()
            zero_step()
            self.scheduler.load_state_dict(sched_state)
            for g, lr in zip(base.param_groups, lrs):
                g["lr"] = lr
        with torch.no_grad():
            for n in self.names:
                p = self._params[n]
                if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                    safe_set_full_fp32_param(p, params[n].to(self.device))
                if not hasattr(p, "ds_id"):
                    p.data.copy_(params[n].to(p.dtype))
                if moments and opt_step > 0:
                    for key in MOMENTS:
                        v = moments[key][n].to(self.device)
                        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                            safe_set_full_optimizer_state(p, v, key)
                        else:
                            base.state[p][key].copy_(v)
            if self.stage == 3:
                self._refresh_zero3_lp()
        if moments and opt_step > 0:
            for st in base.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(float(opt_step), dtype=st["step"].dtype) \
                        if torch.is_tensor(st["step"]) else opt_step

    def _refresh_zero3_lp(self) -> None:
        """ZeRO-3: copy the (just written) fp32 partitions into the low-precision parameter partitions."""
        opt = self.optimizer
        for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)

    def scheduler_state(self) -> dict:
        return self.scheduler.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        for g, lr in zip(_base_optimizer(self.optimizer).param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr
