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

The Qwen3-0.6B shape (configs/backbones/qwen3-0.6b.json, random weights, fp32) is timed the same way at
``qwen_lengths`` (default 100 and 200 items) with ``qwen_batch`` users per request (default 4, not 32: the decoder
keeps one KV cache row per beam, and 32 users x beam 20 x 200 items at that shape is 29 GB of fp32 cache, more than
this machine; ``beam_cache_bytes`` in the JSON); its storage is computed analytically (bf16) at every length.
The JSON holds ``storage_ratio_full_over_memory`` and ``latency_ratio_full_over_memory`` at the longest timed T
of the tiny shape, and the same latency ratio for the Qwen3-0.6B shape under ``qwen3_0.6b``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

LENGTHS = (100, 200, 500, 1000, 2000)
QWEN_LENGTHS, QWEN_BATCH = (100, 200), 4
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
def _time_lengths(backbone, lengths, batch: int, beam: int, tokens: int, seg: int, reps: int, warmup: int,
                  n_items: int, levels: int, codebook: int, rng) -> list[dict]:
    """Full-history tm vs preference-memory tm on the same ``backbone``: latency per request batch at each length."""
    from comeir_dist.decode.beam import beam_search
    from comeir_dist.decode.trie import PrefixTrie
    from comeir_dist.model.baselines import GenerativeBaseline
    from comeir_dist.model.history import Catalog, HistoryBatch
    from comeir_dist.model.pref_memory import MemoryBatch, PrefMemoryTM
    from comeir_dist.model.pref_memory_config import PrefMemoryConfig

    grid_n = codebook ** levels
    flat = rng.choice(grid_n, n_items, replace=False)
    codes = torch.as_tensor(np.stack([(flat // codebook ** (levels - 1 - l)) % codebook for l in range(levels)], -1))
    catalog = Catalog(codes, torch.zeros(n_items, 8))
    cb = torch.randn(levels, codebook, 8)
    trie = PrefixTrie.from_codes(codes, codebook)
    full = GenerativeBaseline("tm", catalog, cb, backbone, 16).eval()
    pm = PrefMemoryConfig(enabled=True, tokens=tokens, segment_items=seg, archive_items=max(lengths))
    mem_model = PrefMemoryTM(catalog, cb, backbone, 16, pm).eval()
    full.trie = mem_model.trie = trie
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
               "update_ms": _timed(lambda: mem_model.update(m, mm, seg_items), reps, warmup)}
        row["latency_ratio"] = row["full_ms"] / row["memory_ms"]
        rows.append(row)
    return rows


@torch.no_grad()
def run_longseq_bench(out: str | None, lengths=LENGTHS, batch: int = 32, beam: int = 20, tokens: int = 4,
                      seg: int = 20, reps: int = 2, warmup: int = 1, threads: int | None = None, n_items: int = 2000,
                      levels: int = 3, codebook: int = 32, seed: int = 0, qwen_lengths=QWEN_LENGTHS,
                      qwen_batch: int = QWEN_BATCH, qwen_config: str = QWEN3) -> dict:
    from comeir_dist.config.run import BackboneConfig
    from comeir_dist.errors import UserError
    from comeir_dist.model.backbone import build_backbone, load_config_file

    for flag, ls in (("--lengths", lengths), ("--qwen-lengths", qwen_lengths)):
        if ls and max(ls) < seg:
            raise UserError(f"{flag} {','.join(map(str, ls))}: the longest history must hold at least one segment "
                            f"({seg} items)")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    args = dict(beam=beam, tokens=tokens, seg=seg, reps=reps, warmup=warmup, n_items=n_items, levels=levels,
                codebook=codebook, rng=rng)
    backbone = build_backbone(BackboneConfig(**TINY)).eval()
    tiny_shape = _shape(backbone.config)
    rows = [{**r, **storage(tiny_shape, r["history"], tokens, seg, 4)}
            for r in _time_lengths(backbone, lengths, batch, **args)]
    qwen = None
    if Path(qwen_config).is_file():
        qshape = _shape(load_config_file(qwen_config))
        sized = sorted(set(lengths) | set(qwen_lengths))
        qwen = {"config_file": qwen_config, "shape": qshape, "bytes": 2,
                "rows": [{"history": t, **storage(qshape, t, tokens, seg, 2)} for t in sized]}
        if qwen_lengths:
            big = build_backbone(BackboneConfig(arch="qwen3", config_file=qwen_config, dropout=0.0)).float().eval()
            timed = _time_lengths(big, qwen_lengths, qwen_batch, **args)
            longest = max(qwen_lengths)
            qwen.update(timed_rows=timed, timed_batch=qwen_batch, timed_dtype="fp32",
                        latency_ratio_full_over_memory=timed[-1]["latency_ratio"], longest_timed_history=longest,
                        beam_cache_bytes={"batch": batch, "beam": beam, "history": longest,
                                          "bytes": batch * beam * kv_bytes(qshape["layers"], qshape["kv_heads"],
                                                                           qshape["head_dim"], longest, 4)})
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
    lines = ["| T | full KV bytes | memory bytes | KV-Mask bytes (analytic) | storage x | full ms | memory ms | "
             "update ms | latency x |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['history']} | {r['full_kv_bytes']} | {r['memory_bytes']} | {r['kv_memory_bytes']} | "
                     f"{r['ratio']:.0f} | {r['full_ms']:.1f} | {r['memory_ms']:.1f} | {r['update_ms']:.1f} | "
                     f"{r['latency_ratio']:.2f} |")
    q = rep.get("qwen3_0.6b")
    if q and q.get("timed_rows"):
        lines += ["", f"Qwen3-0.6B shape, timed (fp32, random weights, batch {q['timed_batch']}, beam {rep['beam']}):",
                  "", "| T | full ms | memory ms | update ms | latency x |", "|---|---|---|---|---|"]
        lines += [f"| {r['history']} | {r['full_ms']:.0f} | {r['memory_ms']:.0f} | {r['update_ms']:.0f} | "
                  f"{r['latency_ratio']:.2f} |" for r in q["timed_rows"]]
    if q:
        lines += ["", "Qwen3-0.6B shape (bf16, analytic): " + ", ".join(
            f"T={r['history']}: {r['full_kv_bytes'] / 2**20:.1f} MiB vs {r['memory_bytes'] / 1024:.0f} KiB"
            for r in q["rows"]) + "; the KV-Mask state of the same C tokens: "
            f"{q['rows'][0]['kv_memory_bytes'] / 1024:.0f} KiB"]
    return "\n".join(lines) + "\n"

