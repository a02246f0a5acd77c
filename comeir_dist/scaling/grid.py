"""Scaling grid: scale lists, one RunConfig per (s_T, s_S) point, P_S / P_T, and the memory plan per point.

A point's run config is the base config with ``engram.s_t`` / ``engram.s_s`` / ``engram.table_dtype`` set,
``out`` = ``<sweep_dir>/runs/<key>``, ``train.save_best = False`` (no full-table copy / GiB-sized
``best/``) and ``train.final_test = True`` (test metrics of the final in-memory model in summary.json).
A point whose memory plan (``comeir plan``) does not fit is refused before anything starts.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import Field

from comeir_dist.config.base import Section
from comeir_dist.config.run import RunConfig
from comeir_dist.errors import UserError

X_AXES = ("auto", "inter", "intra", "total")
# keys of a point's run config that do not change what is trained (only where it runs / the fit check)
FINGERPRINT_EXCLUDE = ("out", "train.num_threads", "train.check_memory", "parallel.device_memory_gib",
                       "parallel.headroom", "parallel.reserve_gib")


class ScalingSettings(Section):
    """The ``scaling:`` section of a scaling config (each key also a ``comeir scaling`` flag)."""

    s_t: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],
                             description="Inter scales s_T (--s-t); crossed with s_s.")
    s_s: list[float] = Field(default_factory=lambda: [1.0], description="Intra scales s_S (--s-s).")
    table_dtype: Literal["fp16", "fp32"] = Field("fp16", description="Engram table dtype of every point (--dtype).")
    out: Optional[str] = Field(None, description="Sweep dir (--out); None = the run config's `out`.")
    cpus_per_point: Optional[float] = Field(None, gt=0, description="Ray CPUs per point (--cpus-per-point); "
                                            "None = every CPU of the cluster, i.e. one point at a time.")
    x_axis: Literal["auto", "inter", "intra", "total"] = Field(
        "auto", description="Sparse-parameter axis of the plot/fit: inter = P_T, intra = P_S, total = P_S + P_T; "
        "auto = the memory whose scale varies (as in the paper's Figure 3), total if both or neither vary.")
    metric: str = Field("item/hit@5", description="Metric plotted and fitted.")


# ---- scale lists ------------------------------------------------------------------------------------------
def _number(text: str, flag: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a number (expected e.g. 0.5,1,2 or 0.5:4:0.5)") from None
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{flag}: {text!r}; scales must be finite and > 0")
    return v


def parse_scales(value: Union[str, Sequence[Any], float, int], flag: str) -> list[float]:
    """``"0.5,1,2"``, ``"0.5:2:0.5"`` (inclusive range; may be mixed with single values) or a list of numbers
    -> sorted distinct positive floats. Every problem is a UserError naming ``flag``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [str(value)]
    elif isinstance(value, str):
        items = [x.strip() for x in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(x).strip() for x in value]
    else:
        raise UserError(f"{flag}: expected a comma-separated list of scales, got {value!r}")
    out: list[float] = []
    for item in items:
        if not item:
            raise UserError(f"{flag}: empty value in {value!r}")
        if ":" in item:
            parts = item.split(":")
            if len(parts) != 3:
                raise UserError(f"{flag}: range {item!r} must be start:stop:step")
            lo, hi, step = (_number(p, flag) for p in parts)
            if hi < lo:
                raise UserError(f"{flag}: range {item!r} has stop < start")
            n = int(math.floor((hi - lo) / step + 1e-9))
            if n > 1000:
                raise UserError(f"{flag}: range {item!r} has more than 1000 values")
            out += [round(lo + i * step, 10) for i in range(n + 1)]
        else:
            out.append(_number(item, flag))
    seen = set()
    for v in out:
        if v in seen:
            raise UserError(f"{flag}: value {v:g} is given twice")
        seen.add(v)
    return sorted(out)


# ---- points -----------------------------------------------------------------------------------------------
def point_key(s_t: float, s_s: float, dtype: str) -> str:
    return f"st{s_t:g}_ss{s_s:g}_{dtype}"


def config_fingerprint(cfg: RunConfig) -> str:
    """sha256 of the point's run config without the keys that do not change the trained model."""
    data = cfg.model_dump(mode="json")
    for dotted in FINGERPRINT_EXCLUDE:
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class GridPoint:
    key: str
    s_t: float
    s_s: float
    cfg: RunConfig
    p_s: int
    p_t: int
    fingerprint: str
    plan: Any = None  # MemoryPlan
    info: dict = field(default_factory=dict)

    @property
    def p_total(self) -> int:
        return self.p_s + self.p_t

    @property
    def fits(self) -> bool:
        return self.plan is None or self.plan.fits

    def plan_record(self) -> Optional[dict]:
        if self.plan is None:
            return None
        w = self.plan.worst
        return {"fits": self.plan.fits, "message": self.plan.message(), "world_size": self.plan.world_size,
                "device": self.plan.device, "worst_rank": w.rank, "worst_rank_bytes": w.total,
                "usable_bytes": self.plan.usable_bytes, "table_bytes": self.plan.totals["table_bytes"],
                "optimizer_bytes": self.plan.totals["optimizer_bytes"], "sharding": self.plan.sharding}

    def base_record(self) -> dict:
        """Everything known before the point runs (key, scales, sizing formulas, plan)."""
        return {"key": self.key, "s_t": self.s_t, "s_s": self.s_s, "table_dtype": self.cfg.engram.table_dtype,
                "P_S": self.p_s, "P_T": self.p_t, "P_total": self.p_total, "run_dir": self.cfg.out,
                "fingerprint": self.fingerprint, "plan": self.plan_record()}


def point_config(base: RunConfig, s_t: float, s_s: float, dtype: str, run_dir: Path,
                 num_threads: Optional[int] = None, device_memory_gib: Optional[float] = None) -> RunConfig:
    data = base.model_dump(mode="json")
    data["out"] = str(run_dir)
    data["engram"].update(s_t=s_t, s_s=s_s, table_dtype=dtype)
    data["train"].update(save_best=False, final_test=True)
    if num_threads and data["train"].get("num_threads") is None:
        data["train"]["num_threads"] = int(num_threads)
    if device_memory_gib is not None:
        data["parallel"]["device_memory_gib"] = float(device_memory_gib)
    try:
        return RunConfig.model_validate(data)
    except Exception as exc:  # pydantic ValidationError: one line naming the key
        from pydantic import ValidationError

        from comeir_dist.config.base import validation_message

        if isinstance(exc, ValidationError):
            raise UserError(validation_message(exc, f"scaling point {point_key(s_t, s_s, dtype)}")) from None
        raise


def build_grid(base: RunConfig, settings: ScalingSettings, sweep_dir: Path, num_threads: Optional[int] = None,
               device_memory_gib: Optional[float] = None) -> list[GridPoint]:
    """Every (s_S, s_T) point in ascending order with its config and table sizes (Eq. 34, 38); no plan yet."""
    from comeir_dist.engram.sizing import intra_params, inter_params

    if base.model.variant != "comeir":
        raise UserError(f"model.variant: {base.model.variant!r}; the scaling sweep varies the Engram memories of "
                        "'comeir'")
    if base.parallel.world_size != 1:
        raise UserError(f"parallel.world_size: {base.parallel.world_size}; every scaling point trains in one "
                        "process (world size 1), set it to 1")
    s_t = parse_scales(settings.s_t, "--s-t")
    s_s = parse_scales(settings.s_s, "--s-s")
    points = []
    for ss in s_s:
        for st in s_t:
            key = point_key(st, ss, settings.table_dtype)
            cfg = point_config(base, st, ss, settings.table_dtype, sweep_dir / "runs" / key, num_threads,
                               device_memory_gib)
            points.append(GridPoint(key, st, ss, cfg, intra_params(cfg.engram), inter_params(cfg.engram),
                                    config_fingerprint(cfg)))
    return points


# ---- memory plan per point --------------------------------------------------------------------------------
def dataset_shape(dataset: str) -> tuple[int, int]:
    """(item count, item-embedding width) of a prepared dataset, read from Parquet metadata only; (0, 384) if
    the dataset or its embeddings are not there yet (the plan then omits the replicated catalog)."""
    import pyarrow.parquet as pq

    path = Path(dataset) / "item_emb.parquet"
    try:
        meta = pq.read_metadata(path)
        dim = pq.read_schema(path).field("embedding").type.list_size
        return int(meta.num_rows), int(dim)
    except Exception:  # noqa: BLE001 - missing/unreadable: training reports it properly
        return 0, 384


def plan_points(points: Sequence[GridPoint]) -> None:
    """Attach the memory plan (the check training runs before it allocates) to every point, in place.

    The dense parameter count does not depend on the table sizes, so the model is counted (meta device)
    once per distinct config with the scales removed."""
    from comeir_dist.parallel.memory_plan import count_dense_params, plan_memory, resolve_device

    counts: dict[str, Any] = {}
    for p in points:
        cfg = p.cfg
        shape_key = cfg.model_copy(update={"engram": cfg.engram.model_copy(update={"s_t": 1.0, "s_s": 1.0}),
                                           "out": ""}).model_dump_json()
        if shape_key not in counts:
            num_items, emb_dim = dataset_shape(cfg.dataset)
            counts[shape_key] = count_dense_params(cfg, item_emb_dim=emb_dim, num_items=num_items)
        p.plan = plan_memory(cfg.engram, counts[shape_key], cfg.parallel, device=resolve_device(cfg.device),
                             dense_dtype="bf16" if cfg.train.bf16 else "fp32")
