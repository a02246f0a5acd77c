"""Hugging Face decoder backbone fed with ``inputs_embeds`` (Qwen3 or Llama; local path or built from config)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from comeir_dist.config.run import BackboneConfig
from comeir_dist.errors import UserError


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Return the bare decoder (``Qwen3Model``/``LlamaModel``, no LM head): hidden states only."""
    from transformers import AutoModel, LlamaConfig, LlamaModel, Qwen3Config, Qwen3Model

    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise UserError(f"model.backbone.path: {cfg.path} is not a local directory (nothing is downloaded)")
        return AutoModel.from_pretrained(cfg.path, local_files_only=True)
    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_positions, vocab_size=8, attention_dropout=cfg.dropout,
                  tie_word_embeddings=False)
    if cfg.arch == "qwen3":
        conf = Qwen3Config(head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, **common)
        model = Qwen3Model(conf)
    else:
        model = LlamaModel(LlamaConfig(head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, **common))
    # inputs come in as embeddings: the token table is never used, drop its weights from optimisation
    model.embed_tokens.weight.requires_grad_(False)
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
