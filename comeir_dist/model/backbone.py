"""Hugging Face decoder backbone fed with ``inputs_embeds`` (Qwen3 or Llama; local path, a config.json, or sizes)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from comeir_dist.config.run import BackboneConfig
from comeir_dist.errors import UserError

REPO_DIR = Path(__file__).resolve().parents[2]
BACKBONE_CONFIG_DIR = REPO_DIR / "configs" / "backbones"  # shipped architecture configs (no weights)
CONFIG_FILE_TYPES = ("qwen3", "llama")  # = BackboneConfig.arch


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def resolve_config_file(value: str) -> Path:
    """``model.backbone.config_file`` as a file: the path itself (absolute, or relative to the working directory),
    else relative to the repo root, else ``configs/backbones/<name>`` (as ``parallel.deepspeed_config`` falls back
    to ``configs/deepspeed/<name>``)."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [p, REPO_DIR / p, BACKBONE_CONFIG_DIR / p.name]
    for c in candidates:
        if c.is_file():
            return c
    if p.is_dir():
        raise UserError(f"model.backbone.config_file: {value} is a directory; give the config.json file itself")
    where = "" if p.is_absolute() else f" (looked in the working directory, {REPO_DIR} and {BACKBONE_CONFIG_DIR})"
    raise UserError(_one_line(f"model.backbone.config_file: {value} not found{where}"))


def load_config_file(value: str):
    """The ``transformers`` config of ``model.backbone.config_file`` (a Hugging Face ``config.json``, no weights).
    Every problem is one line naming the key and the file."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    p = resolve_config_file(value)
    key = f"model.backbone.config_file: {p}"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{key}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise UserError(_one_line(f"{key}: malformed JSON (line {exc.lineno}): {exc.msg}")) from None
    except (OSError, ValueError) as exc:
        raise UserError(_one_line(f"{key}: cannot read: {exc}")) from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: top level must be a JSON object, got {type(data).__name__}")
    kind = data.get("model_type")
    if kind not in CONFIG_FILE_TYPES:
        got = "no 'model_type'" if kind is None else f"model_type {kind!r}"
        raise UserError(f"{key}: {got}; allowed values: {', '.join(CONFIG_FILE_TYPES)}")
    try:
        conf = CONFIG_MAPPING[kind].from_dict(data)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/TypeError/KeyError for bad values
        raise UserError(_one_line(f"{key}: invalid {kind} config: {exc}")) from None
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        v = getattr(conf, name, None)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{key}: {name} = {v!r}; must be a positive integer")
    return conf


def backbone_from_config(conf, key: str = "model.backbone.config_file") -> nn.Module:
    """The bare decoder ``AutoModel.from_config`` builds (random init; on the meta device under a meta context).
    Its token table is frozen as for every backbone (:func:`build_backbone`), so a run with ``path`` and one with
    only ``config_file`` count and train the same parameters."""
    from transformers import AutoModel

    try:
        return _freeze_token_table(AutoModel.from_config(conf))
    except Exception as exc:  # noqa: BLE001 - inconsistent sizes surface here (e.g. heads vs hidden size)
        raise UserError(_one_line(f"{key}: cannot build the {conf.model_type} model: {exc}")) from None


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Return the bare decoder (``Qwen3Model``/``LlamaModel``, no LM head): hidden states only.

    ``path`` (a local checkpoint) wins; without it ``config_file`` gives the architecture (random init);
    otherwise the sizes of ``cfg``. Inputs come in as embeddings, so the token table is never used: it is frozen
    (for Qwen3-0.6B that keeps 156 M parameters and their AdamW state out of the optimizer)."""
    from transformers import AutoModel, LlamaConfig, LlamaModel, Qwen3Config, Qwen3Model

    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise UserError(f"model.backbone.path: {cfg.path} is not a local directory (nothing is downloaded)")
        return _freeze_token_table(AutoModel.from_pretrained(cfg.path, local_files_only=True))
    if cfg.config_file:
        return backbone_from_config(load_config_file(cfg.config_file))
    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_positions, vocab_size=8, attention_dropout=cfg.dropout,
                  tie_word_embeddings=False)
    if cfg.arch == "qwen3":
        conf = Qwen3Config(head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, **common)
        model = Qwen3Model(conf)
    else:
        model = LlamaModel(LlamaConfig(head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, **common))
    return _freeze_token_table(model)


def _freeze_token_table(model: nn.Module) -> nn.Module:
    """Inputs come in as embeddings: the token table is never used, drop its weights from optimisation."""
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def backbone_width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def run_backbone(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, past=None, use_cache=False,
                 position_offset: torch.Tensor | None = None):
    """Run on left-padded ``embeds [B, T, d]`` with ``mask [B, T]``; positions count only real tokens."""
    if past is None:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        pos = position_offset.unsqueeze(-1) + torch.arange(embeds.shape[1], device=embeds.device)
    out = model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos, past_key_values=past,
                use_cache=use_cache)
    return out.last_hidden_state, (out.past_key_values if use_cache else None)


def attention_mask_for(model: nn.Module, mask4: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``[B, 1, Q, K]`` bool block mask (True = may attend) as ``model``'s attention takes it: as is for SDPA, an
    additive float mask (0 / dtype min) for eager attention."""
    if model.config._attn_implementation == "sdpa":
        return mask4
    return torch.zeros(mask4.shape, dtype=dtype, device=mask4.device).masked_fill(~mask4, torch.finfo(dtype).min)
