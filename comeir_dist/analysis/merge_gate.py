"""`comeir analyze merge`: how much of ComeIR's item vector comes from the encoder's Engram memories.

The memory-conditioned merge (Eq. 7) adds, per level l, ``omega_l * W_V,l u_l`` to the scored token mix s^0, with
``omega_l = sigma((W_Q s^{l-1})^T (W_K,l u_l) + b_l)`` and ``u_l = [eta^S_l; eta^T_l]`` the encoder's memory reads.
A run whose gate starts nearly closed (``model.merge_gate_bias``) may keep it closed: this reads a trained checkpoint
on real histories and reports, per level, the gate's distribution and the size of the memory term against s^0
(L2 norms per history position, real positions only). Forward hooks on W_Q and W_V,l capture each merge step's state
s^{l-1}, memory input u_l and value W_V,l u_l; the gate is recomputed by the encoder's own ``merge_gate``. Read-only.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from comeir_dist.errors import UserError


def merge_gate_stats(model, items: torch.Tensor, batch_size: int = 256) -> list[dict]:
    """Per merge level: omega mean / median / 10th and 90th percentile, the median ratio ``||omega W_V u|| /
    ||s^0||`` and the median and 90th percentile of ``||omega W_V u|| / ||merge start||`` (the state the merge adds to: s^0, or
    LN(s^0) under ``model.merge_input_norm``) over the real positions of ``items [U, N]`` (left-padded, -1 =
    padding)."""
    enc = getattr(model, "encoder", None)
    if enc is None or not hasattr(enc, "wv_m"):
        raise UserError("comeir analyze merge: the checkpoint's model has no memory-conditioned merge (needs "
                        "model.variant comeir without the no_memory_merge ablation)")
    levels = len(enc.wv_m)
    # per merge step l: the state s^{l-1} entering W_Q (its input), the memory input u_l and the value W_V,l u_l
    seen: dict[str, list] = {"s": [], "u": [], "v": []}

    def value_hook(module, inputs, output) -> None:  # a hook returning a value would replace the layer's output
        seen["u"].append(inputs[0])
        seen["v"].append(output)

    hooks = [enc.wq_m.register_forward_hook(lambda m, i, o: seen["s"].append(i[0]))]
    hooks += [w.register_forward_hook(value_hook) for w in enc.wv_m]
    omegas, ratios, start_ratios = ([[] for _ in range(levels)] for _ in range(3))
    s0_norms, start_norms = [], []
    try:
        with torch.no_grad():
            for start in range(0, items.shape[0], batch_size):
                for v in seen.values():
                    v.clear()
                out = model.encoder_pass(items[start:start + batch_size])
                s_in, u_in, v_out = (list(seen[k]) for k in ("s", "u", "v"))  # merge_gate below fires the W_Q hook
                mask, s0_norm = out["mask"], out["s0"].norm(dim=-1)
                start_norm = s_in[0].norm(dim=-1)  # W_Q's input at the first step = the merge's start
                s0_norms.append(s0_norm[mask])
                start_norms.append(start_norm[mask])
                for l in range(levels):  # the merge runs its steps in level order, one call of each layer per step
                    omega = enc.merge_gate(l, s_in[l], u_in[l]).squeeze(-1)
                    term = omega * v_out[l].norm(dim=-1)
                    omegas[l].append(omega[mask])
                    ratios[l].append((term / s0_norm.clamp_min(1e-12))[mask])
                    start_ratios[l].append((term / start_norm.clamp_min(1e-12))[mask])
    finally:
        for h in hooks:
            h.remove()
    s0_median, start_median = (float(torch.cat(n).median()) for n in (s0_norms, start_norms))
    start = "LN(s0)" if getattr(enc, "merge_in_ln", None) is not None else "s0"
    rows = []
    for l in range(levels):
        o, r, sr = (torch.cat(x[l]).float() for x in (omegas, ratios, start_ratios))
        q = torch.quantile(o, torch.tensor([0.1, 0.5, 0.9])).tolist()
        rows.append({"level": l + 1, "positions": int(o.numel()), "bias": float(enc.b_m[l].detach()),
                     "s0_norm_median": s0_median,
                     "omega_mean": float(o.mean()), "omega_p10": q[0], "omega_median": q[1], "omega_p90": q[2],
                     "memory_to_s0_median": float(r.median()), "merge_start": start,
                     "start_norm_median": start_median,
                     "memory_to_start_median": float(sr.median()), "memory_to_start_p90": float(torch.quantile(sr, 0.9))})
    return rows


def format_merge_stats(rows: list[dict], title: str) -> str:
    lines = [title, "", "| level | positions | b_l | omega mean | omega p10 / median / p90 | "
             "median ||omega W_V u|| / ||s^0|| | median ||s^0|| | merge start | ||omega W_V u|| / ||start|| median / p90 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['level']} | {r['positions']:,} | {r['bias']:.2f} | {r['omega_mean']:.4f} | "
                     f"{r['omega_p10']:.4f} / {r['omega_median']:.4f} / {r['omega_p90']:.4f} | "
                     f"{r['memory_to_s0_median']:.3f} | {r['s0_norm_median']:.3f} | {r['merge_start']} | "
                     f"{r['memory_to_start_median']:.3f} / {r['memory_to_start_p90']:.3f} |")
    lines.append("")
    lines.append(f"mean over levels of the median memory / s^0 ratio: "
                 f"{statistics.fmean(r['memory_to_s0_median'] for r in rows):.3f}")
    return "\n".join(lines)


def run_merge_stats(checkpoint: str, split: str = "test", users: int | None = 2048, dataset: str | None = None,
                    out: str | None = None) -> list[dict]:
    """Load ``checkpoint`` (RUN/best) and measure the merge on the first ``users`` histories of ``split``."""
    from comeir_dist.eval.run_eval import load_model_from_checkpoint
    from comeir_dist.train.samples import split_samples
    from comeir_dist.utils.atomic import write_json
    from comeir_dist.utils.output_guard import check_out_file

    if out:
        check_out_file(Path(out))
    if not Path(checkpoint).is_dir():
        raise UserError(f"--checkpoint: {checkpoint} is not a checkpoint directory (RUN/best)")
    model, cfg, _meta, _dev = load_model_from_checkpoint(Path(checkpoint), dataset)
    hist = split_samples(cfg.dataset, split, cfg.max_history)[1]
    items = torch.as_tensor(hist[: users or len(hist)])
    model.eval()
    rows = merge_gate_stats(model, items)
    if out:
        write_json(Path(out), {"checkpoint": str(checkpoint), "split": split, "users": int(items.shape[0]),
                               "levels": rows})
    return rows
