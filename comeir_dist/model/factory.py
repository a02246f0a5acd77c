"""Build any variant (comeir / flatten / tm; sasrec) x decoding (normal / nezha) from a RunConfig, the SID table and
the item embeddings."""
from __future__ import annotations

import numpy as np
import torch

from comeir_dist.config.run import RunConfig
from comeir_dist.decode.trie import PrefixTrie
from comeir_dist.errors import UserError
from comeir_dist.model.backbone import build_backbone
from comeir_dist.model.baselines import GenerativeBaseline
from comeir_dist.model.comeir import ComeIRModel
from comeir_dist.model.comeir_encoder import EncoderMemoryOptions
from comeir_dist.model.history import Catalog


def build_model(cfg: RunConfig, codes: np.ndarray, codebooks: np.ndarray, item_emb: np.ndarray,
                sparse_device: str = "cpu") -> torch.nn.Module:
    if cfg.model.pref_memory.enabled:  # Rec2PM preference memory (tm, sasrec, comeir; others refused there)
        from comeir_dist.model.pref_memory import build_pref_memory_model

        return build_pref_memory_model(cfg, codes, codebooks, item_emb, sparse_device=sparse_device)
    if cfg.model.variant == "sasrec":  # item IDs: no SIDs, codebooks, item embeddings or tables are used
        return build_sasrec(cfg, num_items=codes.shape[0])
    levels, size = codebooks.shape[0], codebooks.shape[1]
    if (levels, size) != (cfg.engram.levels, cfg.engram.codebook_size):
        raise UserError(f"SID table has L={levels}, C={size} but config engram.levels={cfg.engram.levels}, "
                        f"engram.codebook_size={cfg.engram.codebook_size}")
    if codes.shape[0] != item_emb.shape[0]:
        raise UserError(f"SID table has {codes.shape[0]} items but item embeddings have {item_emb.shape[0]}")
    check_positions(cfg)  # before the backbone is built
    codes_t = torch.as_tensor(codes, dtype=torch.long)
    catalog = Catalog(codes_t, torch.as_tensor(item_emb, dtype=torch.float32))
    backbone = build_backbone(cfg.model.backbone)
    cb = torch.as_tensor(codebooks, dtype=torch.float32)
    trie = PrefixTrie.from_codes(codes_t, size)
    m = cfg.model
    if m.variant == "comeir":
        model = ComeIRModel(cfg.engram, catalog, cb, backbone, trie, m.token_dim, m.window, set(m.ablations),
                            sparse_device=sparse_device, head_interaction=m.head_interaction,
                            memory_dropout=m.memory_dropout, head_memory_grad=m.head_memory_grad,
                            decoding=m.decoding, nezha_delta=m.nezha_delta, fusion=m.token_fusion, decor=m.decor,
                            head=m.comeir_head, encoder_options=EncoderMemoryOptions.from_model_config(m))
    else:
        model = GenerativeBaseline(m.variant, catalog, cb, backbone, m.token_dim, decoding=m.decoding,
                                   nezha_delta=m.nezha_delta, window=m.window, fusion=m.token_fusion, decor=m.decor)
        model.trie = trie
    return model


def check_positions(cfg: RunConfig) -> None:
    """NEZHA appends L placeholders to the inputs (Eq. 40): the backbone needs inputs + L positions.
    (Normal GR's needs are checked by RunConfig; a local checkpoint brings its own, larger, limit.)"""
    m, levels = cfg.model, cfg.engram.levels
    if m.decoding != "nezha" or m.backbone.path:
        return
    inputs = cfg.max_history * (levels if m.variant == "flatten" else 1)
    if m.backbone.max_positions < inputs + levels:
        raise UserError(f"model.backbone.max_positions={m.backbone.max_positions} < {inputs + levels} needed by "
                        f"{m.variant} with model.decoding=nezha (inputs {inputs} + {levels} placeholders)")


def build_sasrec(cfg: RunConfig, num_items: int) -> torch.nn.Module:
    """The item-ID baseline (model/sasrec.py): one learned embedding per catalog item, the configured backbone."""
    from comeir_dist.model.sasrec import SASRecModel

    m = cfg.model
    if m.decoding != "normal":
        raise UserError(f"model.decoding={m.decoding} applies to SID models; model.variant sasrec scores all items "
                        f"in one pass (use model.decoding: normal)")
    return SASRecModel(num_items, build_backbone(m.backbone), dropout=m.backbone.dropout)
