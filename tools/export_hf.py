#!/usr/bin/env python
"""Export the trained Hugging Face backbone of a ``best/`` checkpoint as a standalone model directory.

    python tools/export_hf.py RUN/best OUT [--dtype float32|bfloat16|float16] [--overwrite]

OUT receives (written to a temporary sibling, renamed at the end):

* ``config.json`` + ``model.safetensors``: the decoder (``Qwen3Model`` / ``LlamaModel``, no LM head) via
  ``save_pretrained``; ``transformers.AutoModel.from_pretrained(OUT)`` loads it without comeir-dist installed;
* ``comeir_sid.json``: the SID setup and run metadata (levels, codebook size, SID method and fingerprint, variant,
  the input layout and token-embedding shapes the checkpoint holds, the step, metrics and full run config);
* ``comeir_sid_tokens.safetensors``: the learnable SID token embedding e^T and its projection W_E (and the token
  merge layer of the ``tm`` variant) -- what turns SID codes into the backbone's input vectors (Eq. 2);
* ``README.md``: a model card describing all of the above.

The checkpoint is verified (COMMITTED + sha256 checksums, by the product's code) before any tensor is read, and
tensors are read with ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import output_dir, run_tool, sha256_of  # noqa: E402

PROG = "export_hf"
KIND = "hf-export"
SID_JSON = "comeir_sid.json"
SID_TOKENS = "comeir_sid_tokens.safetensors"
HF_VARIANTS = ("comeir", "flatten", "tm")  # the model variants (model/factory.py): each has a Hugging Face decoder
PLACEHOLDERS = "nezha.placeholders.p"  # model.decoding: nezha -- L trained input vectors after the history (Eq. 40)
DTYPES = ("float32", "bfloat16", "float16")
log = logging.getLogger("comeir_dist.tools.export_hf")

INPUT_LAYOUT = {
    "comeir": "one input vector per history item: r_n, built by the ComeIR encoder from the item's L SID token "
              "embeddings, its cached multimodal item embedding and the Engram memories (not exported: they need "
              "the hashed Engram tables of the run)",
    "flatten": "L input vectors per history item (TIGER-style): the SID token embedding of each of its L codes, "
               "items in time order, then the codes of the target generated so far",
    "tm": "one input vector per history item (token merge): the L SID token embeddings of the item concatenated "
          "and projected by merge (L*d -> d), then the codes of the target generated so far",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export the trained Hugging Face backbone of a comeir best/ "
                                "checkpoint (save_pretrained) with a model card and SID metadata.")
    p.add_argument("checkpoint", help="RUN/best (or a run dir holding best/)")
    p.add_argument("out", help="output directory (new, empty, or an earlier export; else needs --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype of the export (default float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT (an earlier export is replaced; other files are kept)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


# ---- reading the checkpoint ------------------------------------------------------------------------------------
def resolve_checkpoint(path: Path) -> Path:
    from comeir_dist.errors import UserError

    if not path.exists():
        raise UserError(f"{path}: not found")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; give a best/ checkpoint directory")
    if not (path / "meta.json").exists() and (path / "best" / "meta.json").is_file():
        return path / "best"
    if (path / "state.json").is_file():
        raise UserError(f"{path}: is a step checkpoint (checkpoints/step-N); export the best model: RUN/best")
    return path


def load_backbone_state(ckpt: Path) -> tuple[dict, object, dict]:
    """(meta.json, RunConfig, dense state) of a verified best/ checkpoint."""
    import torch

    from comeir_dist.config.base import parse_section
    from comeir_dist.config.run import RunConfig
    from comeir_dist.errors import UserError
    from comeir_dist.train import checkpoint_simple as simple

    meta = simple.read_meta(ckpt)  # COMMITTED + meta.json checksum
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise UserError(f"{ckpt / 'meta.json'}: malformed (no run config)")
    variant = meta.get("variant") or (meta["config"].get("model") or {}).get("variant")
    if variant not in HF_VARIANTS:
        raise UserError(f"{ckpt}: variant {variant!r} has no Hugging Face backbone (only {', '.join(HF_VARIANTS)} "
                        f"have one); nothing to export")
    cfg = parse_section(RunConfig, meta["config"], source=f"{ckpt / 'meta.json'}")
    simple._verify(ckpt, only=["dense.pt", "meta.json"])  # the product's check, before torch.load
    try:
        dense = torch.load(ckpt / "dense.pt", weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a damaged/foreign file: one line
        raise UserError(f"{ckpt / 'dense.pt'}: cannot be read as a weights-only tensor file "
                        f"({exc.__class__.__name__})") from None
    if not isinstance(dense, dict) or not any(k.startswith("backbone.") for k in dense):  # any future variant
        raise UserError(f"{ckpt / 'dense.pt'}: holds no backbone weights (variant {variant!r}); nothing to export")
    return meta, cfg, dense


def build_hf_backbone(cfg, state: dict):
    """The product's backbone (``model.backbone.build_backbone``) with the checkpoint's weights loaded strictly."""
    from comeir_dist.errors import UserError

    bcfg = cfg.model.backbone
    if bcfg.path:  # a pretrained local model: its architecture from its config, the weights from the checkpoint
        from transformers import AutoConfig, AutoModel

        if not Path(bcfg.path).is_dir():
            raise UserError(f"model.backbone.path: {bcfg.path} is not a local directory; its config.json is needed "
                            f"for the architecture (nothing is downloaded)")
        model = AutoModel.from_config(AutoConfig.from_pretrained(bcfg.path, local_files_only=True))
    else:
        from comeir_dist.model.backbone import build_backbone

        model = build_backbone(bcfg)
    sd = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint backbone does not match model.backbone of its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.requires_grad_(False)
    return model.eval()


# ---- metadata ---------------------------------------------------------------------------------------------------
def _shape(state: dict, key: str):
    t = state.get(key)
    return list(t.shape) if t is not None else None


def sid_metadata(ckpt: Path, meta: dict, cfg, state: dict, model) -> dict:
    levels, size = cfg.engram.levels, cfg.engram.codebook_size
    tok = _shape(state, "tokens.token.weight")
    proj = _shape(state, "tokens.proj.weight")
    token_dim = tok[1] if tok else None
    codebook_dim = proj[1] - token_dim if proj and token_dim is not None else None
    hidden = int(model.config.hidden_size)
    vocab = int(model.config.vocab_size)
    sid = {
        "method": cfg.sid_method, "levels": levels, "codebook_size": size,
        "fingerprint": meta.get("sid_fingerprint"),
        "fingerprint_definition": "sha256 of the [items, levels] int32 code array (row = item_idx) of "
                                  f"DATASET/sids/{cfg.sid_method}/codes.parquet",
        "token_embedding": {
            "rows": tok[0] if tok else None, "token_dim": token_dim, "codebook_dim": codebook_dim,
            "hidden_size": hidden,
            "row_of_code": "level * codebook_size + code (level 0-based)",
            "formula": "e_c = W_E [e^B_c ; e^T_c]: frozen codebook vector e^B (codebooks.npy of the SID method, not "
                       "in the checkpoint) concatenated with the learnable token e^T, projected to the hidden size",
            "tensors": SID_TOKENS,
        },
    }
    if tok and tok[0] != levels * size:
        sid["token_embedding"]["note"] = f"{tok[0]} rows != levels x codebook_size = {levels * size}"
    backbone = {
        "class": type(model).__name__, "arch": cfg.model.backbone.arch, "pretrained_from": cfg.model.backbone.path,
        "hidden_size": hidden, "num_layers": int(model.config.num_hidden_layers),
        "num_heads": int(model.config.num_attention_heads),
        "num_kv_heads": int(getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)),
        "max_positions": int(model.config.max_position_embeddings),
        "placeholder_vocab": {"embed_tokens_rows": vocab, "note": "embed_tokens is a placeholder: comeir feeds "
                              "inputs_embeds, never token ids (no tokenizer is exported)"},
        "position_ids": "left-padded inputs; position_ids = cumsum(attention_mask) - 1 clamped at 0",
    }
    decoding = getattr(cfg.model, "decoding", "normal")
    inputs = {"layout": INPUT_LAYOUT[cfg.model.variant], "max_history": cfg.max_history, "decoding": decoding}
    if decoding == "nezha" or PLACEHOLDERS in state:
        inputs["layout"] = (INPUT_LAYOUT[cfg.model.variant].split(", then the codes")[0]
                            + f", then {levels} trained placeholder vectors p_1..p_L (NEZHA, Eq. 40); the backbone "
                              "runs once, h_u is its output at the last history input and h_l at placeholder l")
        inputs["placeholders"] = {"count": levels, "shape": _shape(state, PLACEHOLDERS),
                                  "tensor": f"{SID_TOKENS}: placeholders"}
    out = {
        "format": "comeir-hf-export/1", "source_checkpoint": str(ckpt.resolve()), "step": meta.get("step"),
        "metrics": meta.get("metrics"), "variant": cfg.model.variant, "sid": sid, "backbone": backbone,
        "inputs": inputs,
        "heads": "not exported (per-level SID output layers / memory-restoring head live in the comeir checkpoint)",
        "run_config": cfg.model_dump(mode="json"),
    }
    if cfg.model.variant == "tm":
        out["inputs"]["merge"] = _shape(state, "merge.weight")
    ds = _dataset_info(cfg, meta.get("sid_fingerprint"))
    if ds:
        out["dataset"] = ds
    return out


def _dataset_info(cfg, fingerprint) -> dict | None:
    """The SID report of the run's dataset, only when it is present and still the table the model was trained on."""
    d = Path(cfg.dataset)
    try:
        report = json.loads((d / "sids" / cfg.sid_method / "report.json").read_text())
        stats = json.loads((d / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("fingerprint") != fingerprint or not isinstance(stats, dict):
        return None
    keys = ("items", "distinct_sids", "items_in_collisions", "max_items_per_sid", "utilisation", "codebook_shape")
    return {"path": str(d), "users": stats.get("users"), "items": stats.get("items"),
            "interactions": stats.get("interactions"),
            "sid_report": {k: report.get(k) for k in keys if k in report}}


def model_card(info: dict) -> str:
    sid, bb, tok = info["sid"], info["backbone"], info["sid"]["token_embedding"]
    metrics = info.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if k.startswith("item/") and isinstance(v, (int, float)))
    ds = info.get("dataset")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [recommendation, generative-retrieval, semantic-ids, comeir]",
        "---",
        "",
        f"# ComeIR backbone ({info['variant']} variant, {bb['class']})",
        "",
        "The decoder of a semantic-ID generative recommender trained with comeir-dist, exported with "
        "`tools/export_hf.py`. It is the bare decoder (hidden states only, no LM head); the SID input embeddings "
        "are in `" + SID_TOKENS + "`, the output heads are not exported.",
        "",
        "```python",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained(\"OUT\")  # this directory",
        "hidden = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state",
        "```",
        "",
        "## Semantic IDs",
        "",
        "| | |", "|---|---|",
        f"| SID method | {sid['method']} |",
        f"| levels (L) | {sid['levels']} |",
        f"| codebook size (C) | {sid['codebook_size']} |",
        f"| SID fingerprint | `{sid['fingerprint']}` |",
        f"| variant | {info['variant']} (decoding: {info['inputs']['decoding']}) |",
        f"| training step | {info['step']} |",
    ]
    if shown:
        lines.append(f"| validation metrics | {shown} |")
    if ds:
        rep = ds["sid_report"]
        labels = (("distinct_sids", "distinct SIDs"), ("items_in_collisions", "items in collisions"))
        extra = "".join(f", {rep[k]} {label}" for k, label in labels if k in rep)
        lines.append(f"| dataset | {ds['path']}: {ds['users']} users, {ds['items']} items{extra} |")
    lines += [
        "",
        f"The fingerprint is the {sid['fingerprint_definition']}; the model is only meaningful with that SID table.",
        "",
        "## Input layout",
        "",
        f"* Inputs are embeddings (`inputs_embeds`, width {bb['hidden_size']}), never token ids: "
        f"{info['inputs']['layout']}; at most {info['inputs']['max_history']} history items.",
        f"* SID token embedding: {tok['rows']} rows (row = level x C + code) of learnable e^T (width "
        f"{tok['token_dim']}), concatenated with the frozen codebook vector e^B (width {tok['codebook_dim']}, "
        f"`codebooks.npy` of the SID method, not part of the checkpoint) and projected to {tok['hidden_size']} "
        f"(`proj`).",
        f"* `embed_tokens` ({bb['placeholder_vocab']['embed_tokens_rows']} x {bb['hidden_size']}) is a placeholder "
        "and is never used; no tokenizer is exported.",
    ]
    if "placeholders" in info["inputs"]:
        ph = info["inputs"]["placeholders"]
        lines.append(f"* NEZHA decoding: {ph['count']} trained placeholder vectors (shape {ph['shape']}, "
                     f"`placeholders` in `{SID_TOKENS}`) follow the history inputs.")
    lines += [
        f"* Batches are left-padded; positions count real tokens only: {bb['position_ids']}.",
        "",
        "## Backbone",
        "",
        f"{bb['class']} ({bb['arch']}): {bb['num_layers']} layers, hidden {bb['hidden_size']}, {bb['num_heads']} "
        f"heads ({bb['num_kv_heads']} KV heads), {bb['max_positions']} positions"
        + (f", initialised from {bb['pretrained_from']}" if bb["pretrained_from"] else ", trained from scratch") + ".",
        "",
        f"`{SID_JSON}` holds all of this as JSON, with the full run config.",
        "",
    ]
    return "\n".join(lines)


# ---- export --------------------------------------------------------------------------------------------------------
def export(checkpoint: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    from comeir_dist.errors import UserError
    from _common import check_output_dir

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed values {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(Path(checkpoint))
    check_output_dir(Path(out), KIND, overwrite, "OUT")  # before the work: a refused OUT costs nothing
    import torch
    from safetensors.torch import save_file

    meta, cfg, state = load_backbone_state(ckpt)
    model = build_hf_backbone(cfg, state)
    info = sid_metadata(ckpt, meta, cfg, state, model)
    model = model.to(getattr(torch, dtype))
    info["backbone"]["dtype"] = dtype
    tokens = {k[len("tokens."):]: v for k, v in state.items() if k.startswith("tokens.")}
    tokens.update({k: v for k, v in state.items() if k.startswith("merge.")})
    if PLACEHOLDERS in state:
        tokens["placeholders"] = state[PLACEHOLDERS]
    fp = sha256_of(ckpt / "dense.pt")
    with output_dir(out, KIND, f"tools/export_hf.py {ckpt}", overwrite=overwrite, fingerprint=fp,
                    source=str(ckpt.resolve()), dtype=dtype) as tmp:
        model.save_pretrained(tmp)
        if tokens:
            save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tokens.items()}, str(tmp / SID_TOKENS),
                      metadata={"format": "comeir-sid-tokens/1", "levels": str(cfg.engram.levels),
                                "codebook_size": str(cfg.engram.codebook_size)})
        (tmp / SID_JSON).write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(info))
    log.info("exported %s (%s, step %s) to %s", ckpt, type(model).__name__, meta.get("step"), out)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        out = export(args.checkpoint, args.out, args.dtype, args.overwrite)
        print(out)
        return 0

    return run_tool(PROG, body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
