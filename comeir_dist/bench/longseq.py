"""`comeir bench longseq`: serving state and latency of full-history attention vs the Rec2PM preference memory as
the history grows (issue 16).

Per history length T (synthetic histories, one tiny CPU shape, both models on the SAME backbone weights):

* storage per user: full attention keeps the KV cache of the whole history, 2 x layers x kv_heads x head_dim x T
  x bytes; the preference memory keeps C x d x bytes (overwrite; append: C per complete segment, also reported);
  for context, the state of Rec2PM's "KV-Mask" baseline (the per-layer KV cache of C memory tokens, 2 x layers x
  kv_heads x head_dim x C x bytes) is computed analytically: that model is not built, only its state is sized;
* latency per request batch (``batch`` users, beam ``beam``, Normal GR tm decode with KV cache): full = prefill of
  T items + L-1 cached steps; memory = prefill of [M; recent segment] from the stored M + the same steps. The
  memory update (one pass over [M; segment; Q], once per completed segment) is timed separately (``update_ms``).

The Qwen3-0.6B shape (configs/backbones/qwen3-0.6b.json) is storage only, computed analytically (bf16), not timed.
The JSON holds ``storage_ratio_full_over_memory`` and ``latency_ratio_full_over_memory`` at the longest timed T.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

LENGTHS = (100, 200, 500, 1000, 2000)
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
        "max_positions": 4096, "dropout": 0.0}
QWEN3 = "configs/backbones/qwen3-0.6b.json"


def kv_bytes(layers: int, kv_heads: int, head_dim: int, t: int, nbytes: int) -> int:
    return 2 * layers * kv_heads * head_dim * t * nbytes


def _shape(conf) -> dict:
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    return {"layers": conf.num_hidden_layers, "kv_heads": conf.num_key_value_heads, "head_dim": head_dim,
            "hidden": conf.hidden_size}


def storage(shape: dict, t: int, tokens: int, seg: int, nbytes: int) -> dict:
    full = kv_bytes(shape["layers"], shape["kv_heads"], shape["head_dim"], t, nbytes)
    mem = tokens * shape["hidden"] * nbytes
    kv_mem = kv_bytes(shape["layers"], shape["kv_heads"], shape["head_dim"], tokens, nbytes)
    return {"full_kv_bytes": full, "memory_bytes": mem, "append_memory_bytes": mem * ((t - 1) // seg),
            "kv_memory_bytes": kv_mem, "ratio": full / mem}


def _timed(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1000 * (time.perf_counter() - t0) / reps


@torch.no_grad()
def run_longseq_bench(out: str | None, lengths=LENGTHS, batch: int = 32, beam: int = 20, tokens: int = 4,
                      seg: int = 20, reps: int = 2, warmup: int = 1, threads: int | None = None, n_items: int = 2000,
                      levels: int = 3, codebook: int = 32, seed: int = 0) -> dict:
    from comeir_dist.config.run import BackboneConfig
    from comeir_dist.decode.beam import beam_search
    from comeir_dist.decode.trie import PrefixTrie
    from comeir_dist.model.backbone import build_backbone, load_config_file
    from comeir_dist.model.baselines import GenerativeBaseline
    from comeir_dist.model.history import Catalog, HistoryBatch
    from comeir_dist.model.pref_memory import MemoryBatch, PrefMemoryTM
    from comeir_dist.model.pref_memory_config import PrefMemoryConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    grid_n = codebook ** levels
    flat = rng.choice(grid_n, n_items, replace=False)
    codes = torch.as_tensor(np.stack([(flat // codebook ** (levels - 1 - l)) % codebook for l in range(levels)], -1))
    catalog = Catalog(codes, torch.zeros(n_items, 8))
    cb = torch.randn(levels, codebook, 8)
    trie = PrefixTrie.from_codes(codes, codebook)
    backbone = build_backbone(BackboneConfig(**TINY)).eval()
    full = GenerativeBaseline("tm", catalog, cb, backbone, 16).eval()
    pm = PrefMemoryConfig(enabled=True, tokens=tokens, segment_items=seg, archive_items=max(lengths))
    mem_model = PrefMemoryTM(catalog, cb, backbone, 16, pm).eval()
    full.trie = mem_model.trie = trie
    tiny_shape = _shape(backbone.config)
    rows = []
    for t in lengths:
        items = torch.as_tensor(rng.integers(0, n_items, (batch, t)))
        m, mm, recent, _ = mem_model.compress(items)  # the stored serving state (built once per segment)

        def run_full():
            beam_search(full.decoder(HistoryBatch(items)), trie, batch, levels, beam)

        def run_mem():
            beam_search(mem_model.decoder(MemoryBatch(recent, None, m, mm)), trie, batch, levels, beam)

        seg_items = items[:, -seg:]
        row = {"history": t, "full_ms": _timed(run_full, reps, warmup), "memory_ms": _timed(run_mem, reps, warmup),
               "update_ms": _timed(lambda: mem_model.update(m, mm, seg_items), reps, warmup),
               **storage(tiny_shape, t, tokens, seg, 4)}
        row["latency_ratio"] = row["full_ms"] / row["memory_ms"]
        rows.append(row)
    qwen = None
    if Path(QWEN3).is_file():
        qshape = _shape(load_config_file(QWEN3))
        qwen = {"shape": qshape, "bytes": 2, "timed": False,
                "rows": [{"history": t, **storage(qshape, t, tokens, seg, 2)} for t in lengths]}
    last = rows[-1]
    report = {"batch": batch, "beam": beam, "tokens": tokens, "segment_items": seg, "reps": reps,
              "threads": torch.get_num_threads(), "tiny_shape": {**tiny_shape, "bytes": 4}, "rows": rows,
              "qwen3_0.6b": qwen, "longest_timed_history": last["history"],
              "storage_ratio_full_over_memory": last["ratio"], "latency_ratio_full_over_memory": last["latency_ratio"]}
    if out:
        from comeir_dist.utils.atomic import write_json_and_markdown

        write_json_and_markdown(out, report, markdown_table(report))
    return report


def markdown_table(rep: dict) -> str:
    lines = ["| T | full KV bytes | memory bytes | KV-Mask bytes (analytic) | storage x | full ms | memory ms | update ms "
             "| latency x |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['history']} | {r['full_kv_bytes']} | {r['memory_bytes']} | {r['kv_memory_bytes']} | "
                     f"{r['ratio']:.0f} | {r['full_ms']:.1f} | {r['memory_ms']:.1f} | {r['update_ms']:.1f} | {r['latency_ratio']:.2f} |")
    if rep.get("qwen3_0.6b"):
        lines += ["", "Qwen3-0.6B shape (bf16, analytic): " + ", ".join(
            f"T={r['history']}: {r['full_kv_bytes'] / 2**20:.1f} MiB vs {r['memory_bytes'] / 1024:.0f} KiB"
            for r in rep["qwen3_0.6b"]["rows"]) + "; the KV-Mask state of the same C tokens: "
            f"{rep['qwen3_0.6b']['rows'][0]['kv_memory_bytes'] / 1024:.0f} KiB"]
    return "\n".join(lines) + "\n"

