"""`comeir bench latency`: per-batch generation latency of flatten / TM / ComeIR under Normal GR and NEZHA
(paper Section 4.5, Table 3).

All variants share ONE backbone (same module, same random weights), one synthetic catalog (``num_items``
random distinct SIDs, random item embeddings and codebooks) and the same user histories. A measured
"generation" is the full decode of one batch: history encoding + catalog-constrained beam search over the
L levels (``beam_search(model.decoder(batch), ...)``), in eval mode under ``torch.no_grad``; turning the
SIDs into items (collision ranking) is not part of it.

* flatten: L*N history tokens; prefill + (L-1) KV-cached backbone steps over B*K beams.
* tm: N tokens (L code embeddings merged per item); prefill + (L-1) cached steps over B*K beams.
* comeir: N tokens (memory-conditioned item vectors); ONE backbone pass, then the memory-restoring
  head scores the valid candidates of each level (Engram reads, no backbone step per level).
* ``decodings: [..., nezha]`` adds every variant under NEZHA (App. B.2.3, Eq. 40-42): ONE backbone pass
  over the inputs + L placeholders, then per level a GRU step per beam and the output layer / head
  (comeir: the head with a per-beam state); no KV cache, no backbone step per level.

Each (variant, decoding) is one timed model, labelled ``variant`` (normal) or ``variant-nezha``.
Models are timed interleaved (rep-major: for each repetition every model once, the order rotated
each repetition) after ``warmup`` untimed repetitions, so machine load hits them alike. Reported per
model: median, p25/p75, min/max over the repetitions; speedups = median(flatten or tm) / median(comeir)
under the same decoding (``speedup_flatten_over_comeir_normal``, ``..._nezha``; the unsuffixed
``speedup_flatten_over_comeir`` is the Normal-GR one, kept for older readers); ``medians_ms`` holds
every (variant, decoding) median.
The ComeIR Engram tables run through DMP (world size 1, fused fbgemm kernel) as in evaluation, or
unsharded (``sparse: unsharded``).

``device`` (default ``cpu``: the published numbers are CPU timings, and ``auto`` would silently change what is
measured on a GPU host): models, catalog, trie and histories live there; on CUDA every timing is bracketed by
``torch.cuda.synchronize`` and the report's ``machine`` section names the GPU. The CUDA path has not been run.
"""
from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from comeir_dist.config.base import Section, Seed
from comeir_dist.config.run import BackboneConfig
from comeir_dist.engram.config import EngramConfig

log = logging.getLogger(__name__)

VARIANT_ORDER = ("flatten", "tm", "comeir")
DECODING_ORDER = ("normal", "nezha")
QWEN3_06B = dict(arch="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072, max_positions=128, dropout=0.0)


class LatencyBenchConfig(Section):
    """Benchmark setup (defaults = the Qwen3-0.6B-shaped run of configs/bench_latency_qwen3_0.6b.yaml, except
    ``decodings``: the shipped configs time [normal, nezha], the built-in default Normal GR only)."""

    backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(**QWEN3_06B))
    engram: EngramConfig = Field(default_factory=lambda: EngramConfig(s_s=0.5, s_t=1.0))
    num_items: int = Field(4344, ge=2, description="Synthetic catalog size (distinct random SIDs).")
    item_emb_dim: int = Field(384, ge=2, description="Item embedding / codebook width (all-MiniLM-L6-v2: 384).")
    history: int = Field(20, ge=1, description="History items per user (all users have full histories).")
    token_dim: int = Field(64, ge=4)
    window: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1)
    beam_size: int = Field(20, ge=1)
    warmup: int = Field(1, ge=0)
    reps: int = Field(3, ge=1)
    variants: list[Literal["flatten", "tm", "comeir"]] = Field(default_factory=lambda: list(VARIANT_ORDER))
    decodings: list[Literal["normal", "nezha"]] = Field(
        default_factory=lambda: ["normal"], description="Generation architectures timed for every variant "
        "(the shipped configs time both: [normal, nezha]).")
    nezha_delta: Literal["code", "code_context"] = Field("code", description="NEZHA transition input (model.nezha_delta).")
    sparse: Literal["fused", "unsharded"] = Field("fused", description="Engram tables: DMP fused kernel (as in evaluation) or a plain EBC.")
    num_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (None = torch default).")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="Where the models run: cpu (default, the "
        "published CPU numbers), cuda, or auto (cuda when available).")
    seed: Seed = 0

    @model_validator(mode="after")
    def _check(self):
        need = self.history * self.engram.levels + self.engram.levels + 1
        if "flatten" in self.variants and self.backbone.max_positions < need:
            raise ValueError(f"backbone.max_positions={self.backbone.max_positions} < {need} needed by flatten "
                             f"(L*history + L + 1)")
        if self.engram.codebook_size ** self.engram.levels < self.num_items:
            raise ValueError(f"num_items={self.num_items} > C**L: cannot draw distinct SIDs")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError("variants must be a non-empty list without repeats")
        if not self.decodings or len(set(self.decodings)) != len(self.decodings):
            raise ValueError("decodings must be a non-empty list without repeats")
        return self


def label(variant: str, decoding: str) -> str:
    """Name of one timed model: the variant for Normal GR, ``variant-nezha`` for NEZHA."""
    return variant if decoding == "normal" else f"{variant}-{decoding}"


def timed_models(cfg: LatencyBenchConfig) -> list[tuple[str, str, str]]:
    """(label, variant, decoding) of every timed model, decodings in config order, variants within each."""
    return [(label(v, d), v, d) for d in cfg.decodings for v in cfg.variants]


# ---- setup -------------------------------------------------------------------------------------------
def synthetic_catalog(cfg: LatencyBenchConfig, rng: np.random.Generator):
    """(codes [I, L] distinct random SIDs, codebooks [L, C, D], item embeddings [I, D])."""
    L, C, n = cfg.engram.levels, cfg.engram.codebook_size, cfg.num_items
    flat = rng.choice(C ** L, size=n, replace=False).astype(np.int64)  # uniform over all SIDs, distinct
    codes = np.stack([(flat // C ** (L - 1 - l)) % C for l in range(L)], axis=1)
    codebooks = rng.standard_normal((L, C, cfg.item_emb_dim)).astype(np.float32)
    emb = rng.standard_normal((n, cfg.item_emb_dim)).astype(np.float32)
    return codes, codebooks, emb


def bench_device(cfg) -> torch.device:
    """The benchmark's ``device`` (auto | cpu | cuda) through the one device-selection module."""
    from comeir_dist.parallel.dist_env import resolve_device

    return resolve_device(cfg.device)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(cfg: LatencyBenchConfig, device: torch.device | None = None) -> dict[str, torch.nn.Module]:
    """Every (variant, decoding) on ONE shared backbone and catalog, in eval mode, keyed by :func:`label`, on
    ``device`` (None = ``cfg.device``). ComeIR under both decodings also shares one set of Engram tables."""
    from comeir_dist.decode.trie import PrefixTrie
    from comeir_dist.model.backbone import build_backbone
    from comeir_dist.model.baselines import GenerativeBaseline
    from comeir_dist.model.comeir import ComeIRModel
    from comeir_dist.model.history import Catalog

    dev = bench_device(cfg) if device is None else torch.device(device)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    codes, codebooks, emb = synthetic_catalog(cfg, rng)
    codes_t = torch.as_tensor(codes)
    catalog = Catalog(codes_t, torch.as_tensor(emb))
    cb = torch.as_tensor(codebooks)
    backbone = build_backbone(cfg.backbone).eval()
    trie = PrefixTrie.from_codes(codes_t, cfg.engram.codebook_size).to(dev)
    models: dict[str, torch.nn.Module] = {}
    tables = None
    for name, v, dec in timed_models(cfg):
        torch.manual_seed(cfg.seed + 1)
        if v == "comeir":
            fused = cfg.sparse == "fused"
            m = ComeIRModel(cfg.engram, catalog, cb, backbone, trie, cfg.token_dim, cfg.window, set(),
                            sparse_device="meta" if fused or tables is not None else dev,
                            decoding=dec, nezha_delta=cfg.nezha_delta)
            if tables is not None:
                m.tables = tables
            elif fused:
                from comeir_dist.parallel.engram_tables import shard_engram_tables

                shard_engram_tables(m.tables, cfg.engram, device=dev)
            tables = m.tables
        else:
            m = GenerativeBaseline(v, catalog, cb, backbone, cfg.token_dim, decoding=dec,
                                   nezha_delta=cfg.nezha_delta, window=cfg.window)
            m.trie = trie
        models[name] = m.to(dev).eval()
    return models


def synthetic_histories(cfg: LatencyBenchConfig, rng: np.random.Generator) -> torch.Tensor:
    return torch.as_tensor(rng.integers(0, cfg.num_items, size=(cfg.batch_size, cfg.history)), dtype=torch.long)


@torch.no_grad()
def generate(model, items: torch.Tensor, beam_size: int):
    """One full generation: history encoding + constrained beam search over all levels."""
    from comeir_dist.decode.beam import beam_search
    from comeir_dist.model.history import HistoryBatch

    batch = HistoryBatch(items)
    return beam_search(model.decoder(batch), model.trie, items.shape[0], model.levels, beam_size, items.device)


# ---- info ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info(device: torch.device | None) -> dict:
    """``device`` of a benchmark, plus the GPU's name and the CUDA version on CUDA."""
    if device is None or device.type != "cuda":
        return {"device": "cpu" if device is None else str(device)}
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}


def machine_info(device: torch.device | None = None) -> dict:
    import transformers

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    try:  # large fresh tensors page-fault; transparent huge pages and the allocator change that a lot
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = None
    env = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
           if k in os.environ}
    return {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "mem_total_gib": mem,
            "transparent_hugepage": thp, "env": env, "loadavg_start": list(os.getloadavg()), **device_info(device)}


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def variant_shapes(cfg: LatencyBenchConfig) -> dict[str, dict]:
    """Backbone work per timed model and the flatten/TM KV-cache size at the deepest level (fp32).
    NEZHA: the prefill also holds the L placeholders; no cached decode step."""
    b, L, n, k = cfg.backbone, cfg.engram.levels, cfg.history, cfg.beam_size
    head_dim = b.head_dim or b.hidden_size // b.num_heads
    per_token = 2 * b.num_layers * b.num_kv_heads * head_dim * 4  # K and V, fp32
    out = {}
    for name, v, dec in timed_models(cfg):
        tokens = n * L if v == "flatten" else n
        steps = 0 if v == "comeir" or dec == "nezha" else L - 1
        prefill = tokens + (L if dec == "nezha" else 0)
        out[name] = {"variant": v, "decoding": dec, "input_tokens_per_user": tokens,
                     "backbone_prefill_tokens": cfg.batch_size * prefill,
                  "backbone_decode_steps": steps, "backbone_decode_rows_per_step": cfg.batch_size * k if steps else 0,
                  "kv_cache_gib_max": round(cfg.batch_size * k * (tokens + L - 1) * per_token / 2**30, 3) if steps else 0.0}
    return out


def summarize(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p25_ms": float(np.percentile(a, 25)),
            "p75_ms": float(np.percentile(a, 75)), "min_ms": float(a.min()), "max_ms": float(a.max()),
            "reps": int(a.size), "samples_ms": [float(x) for x in a]}


# ---- run -----------------------------------------------------------------------------------------------
def run_latency_bench(cfg: LatencyBenchConfig, out: Optional[str] = None, profile: bool = False) -> dict:
    """Measure, write ``out`` (JSON) and ``out`` with ``.md`` (table); returns the report.

    With ``out``, a partial report (``"complete": false``) is rewritten after every timed repetition."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dev = bench_device(cfg)
    info = machine_info(dev)
    t_build = time.perf_counter()
    models = build_variants(cfg, dev)
    build_s = time.perf_counter() - t_build
    log.info("bench latency: built %s in %.1fs (peak RSS %.2f GiB)", list(models), build_s, peak_rss_gib())
    rng = np.random.default_rng(cfg.seed + 7)
    variants = list(models)
    times: dict[str, list[float]] = {v: [] for v in variants}
    live: dict[str, float] = {}
    for rep in range(cfg.warmup + cfg.reps):
        items = synthetic_histories(cfg, rng).to(dev)  # the same users for every variant of this repetition
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            gc.collect()
            sync(dev)
            t0 = time.perf_counter()
            res = generate(models[v], items, cfg.beam_size)
            sync(dev)
            dt = 1000 * (time.perf_counter() - t0)
            live[v] = float(res.valid.float().mean())
            del res
            if rep >= cfg.warmup:
                times[v].append(dt)
            log.info("rep %d%s %-7s %9.1f ms", rep, " (warm-up)" if rep < cfg.warmup else "", v, dt)
        if out and rep >= cfg.warmup and rep + 1 < cfg.warmup + cfg.reps:  # partial report: a long run killed
            _write(out, _report(cfg, times, live, info, build_s, complete=False))  # midway keeps its reps
    report = _report(cfg, times, live, info, build_s, complete=True)
    if profile:
        report["profile"] = profile_variants(models, cfg, rng, dev)
    if out:
        _write(out, report)
    return report


def _report(cfg: LatencyBenchConfig, times: dict, live: dict, info: dict, build_s: float, complete: bool) -> dict:
    kinds = {name: (v, d) for name, v, d in timed_models(cfg)}
    results = {n: {"variant": kinds[n][0], "decoding": kinds[n][1], **summarize(ts), "live_beam_fraction": live[n]}
               for n, ts in times.items()}
    medians: dict[str, dict[str, float]] = {}
    for r in results.values():
        medians.setdefault(r["variant"], {})[r["decoding"]] = r["median_ms"]
    report = {"benchmark": "generation latency per batch (history encoding + constrained beam search)",
              "complete": complete, "results": results, "medians_ms": medians, "config": cfg.model_dump(mode="json"),
              "shapes": variant_shapes(cfg),
              "machine": {**info, "loadavg_end": list(os.getloadavg()), "peak_rss_gib": peak_rss_gib(),
                          "build_s": round(build_s, 2)}}
    for dec in cfg.decodings:  # flatten / tm over comeir under the same architecture
        comeir = results.get(label("comeir", dec))
        for v in ("flatten", "tm"):
            other = results.get(label(v, dec))
            if comeir and other:
                report[f"speedup_{v}_over_comeir_{dec}"] = other["median_ms"] / comeir["median_ms"]
                if dec == "normal":
                    report[f"speedup_{v}_over_comeir"] = report[f"speedup_{v}_over_comeir_normal"]
    return report


def _write(out: str, report: dict) -> None:
    from comeir_dist.utils.atomic import write_json_and_markdown

    write_json_and_markdown(out, report, markdown_table(report))
    if report["complete"]:
        plot_latency(report, Path(out).with_suffix(".png"))


def plot_latency(report: dict, path: Path) -> None:
    """Bar chart: median ms per timed model, whiskers min..max over the repetitions (NEZHA bars hatched)."""
    from comeir_dist.utils.plotting import pyplot, save_figure

    res = report["results"]
    names = list(res)
    med = [res[v]["median_ms"] for v in names]
    lo = [m - res[v]["min_ms"] for v, m in zip(names, med)]
    hi = [res[v]["max_ms"] - m for v, m in zip(names, med)]
    c = report["config"]
    fig, ax = pyplot().subplots(figsize=(5.6, 3.8), dpi=110)
    colors = {"flatten": "tab:gray", "tm": "tab:orange", "comeir": "tab:blue"}
    bars = ax.bar(names, med, yerr=[lo, hi], capsize=6, color=[colors[res[n]["variant"]] for n in names])
    for bar, n in zip(bars, names):
        if res[n]["decoding"] == "nezha":
            bar.set_hatch("//")
    for i, m in enumerate(med):
        ref = label("comeir", res[names[i]]["decoding"])  # ratio to ComeIR under the same decoding
        ratio = f"\n({m / res[ref]['median_ms']:.2f}x ComeIR)" if ref in res and names[i] != ref else ""
        ax.annotate(f"{m:,.0f} ms{ratio}", (i, m), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("ms per batch (median; whiskers min..max)")
    ax.set_title(f"generation latency: batch {c['batch_size']}, beam {c['beam_size']}, history {c['history']}, "
                 f"backbone {c['backbone']['hidden_size']} x {c['backbone']['num_layers']} layers", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)


def profile_variants(models: dict, cfg: LatencyBenchConfig, rng: np.random.Generator,
                     device: torch.device | None = None, top: int = 15) -> dict:
    """torch.profiler table (self CPU time, top ops; CUDA kernels recorded too on a GPU) of one generation per
    timed model."""
    from torch.profiler import ProfilerActivity, profile

    dev = bench_device(cfg) if device is None else device
    items = synthetic_histories(cfg, rng).to(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    out = {}
    for v, m in models.items():
        with profile(activities=activities) as prof:
            generate(m, items, cfg.beam_size)
        out[v] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return out


def markdown_table(report: dict) -> str:
    cfg, res, shapes = report["config"], report["results"], report["shapes"]
    b = cfg["backbone"]
    lines = [f"# Generation latency per batch (batch {cfg['batch_size']}, beam {cfg['beam_size']}, "
             f"L={cfg['engram']['levels']}, C={cfg['engram']['codebook_size']}, history {cfg['history']})", "",
             f"Backbone {b['arch']}: hidden {b['hidden_size']}, {b['num_layers']} layers, {b['num_heads']} heads "
             f"({b['num_kv_heads']} KV), head_dim {b['head_dim'] or b['hidden_size'] // b['num_heads']}, "
             f"intermediate {b['intermediate_size']} (random weights, shared by all variants). "
             f"Catalog: {cfg['num_items']} random distinct SIDs. Engram s_S={cfg['engram']['s_s']}, "
             f"s_T={cfg['engram']['s_t']}, d_m={cfg['engram']['d_m']}, tables: {cfg['sparse']}.", "",
             "| variant | decoding | input tokens/user | median ms | p25 | p75 | min | max | reps |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in res.items():
        lines.append(f"| {r.get('variant', v)} | {r.get('decoding', 'normal')} | {shapes[v]['input_tokens_per_user']} | "
                     f"{r['median_ms']:.1f} | {r['p25_ms']:.1f} | {r['p75_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['max_ms']:.1f} | {r['reps']} |")
    lines.append("")
    for dec in DECODING_ORDER:
        for v in ("flatten", "tm"):
            key = f"speedup_{v}_over_comeir_{dec}"
            if key in report:
                lines.append(f"- {v} / comeir, {dec} (median latency): **{report[key]:.2f}x**")
    m = report["machine"]
    if not report.get("complete", True):
        lines += ["", "**Partial report: the run did not finish all repetitions.**"]
    gpu = f"; models on {m['device']} ({m['gpu']}, CUDA {m['cuda']})" if m.get("gpu") else ""
    lines += ["", f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads{gpu}, "
              f"{m['mem_total_gib']} GiB RAM; load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; "
              f"peak RSS {m['peak_rss_gib']} GiB. Variants timed interleaved, warm-up {cfg['warmup']}.", ""]
    return "\n".join(lines)
