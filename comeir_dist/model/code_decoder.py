"""Autoregressive SID decoding through the backbone (Normal GR of flatten / tm, and ComeIR's ``head: decoder``).

The backbone reads the history inputs; the output at the last history input (or at an extra BOS input) scores code 1
with the level-1 output layer, the embedding of code l is appended to predict code l+1 (teacher forcing in training,
the beam's chosen code in decoding, with a KV cache per beam reordered by the beams' parents).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from comeir_dist.model.backbone import run_backbone


def teacher_forced_code_logits(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor, fed: torch.Tensor,
                               out: nn.ModuleList, first: int) -> list[torch.Tensor]:
    """Logits ``[B, C]`` per level: ``x [B, T, d]`` history inputs (left-padded, ``mask``), ``fed [B, F, d]`` the
    inputs appended after them (codes 1..L-1, preceded by a BOS input if any); level l is read at ``first + l``."""
    x = torch.cat([x, fed], dim=1)
    mask = torch.cat([mask, torch.ones(fed.shape[:2], dtype=torch.bool, device=mask.device)], dim=1)
    h, _ = run_backbone(backbone, x, mask)
    return [out[l](h[:, first + l]) for l in range(len(out))]


# feed(level, prefixes [B, K, level], b, k) -> the input of the newest code for every beam, [B*K, 1, d]
Feed = Callable[[int, torch.Tensor, int, int], torch.Tensor]


def cached_code_decoder(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor, out: nn.ModuleList, feed: Feed):
    """A ``step_fn`` for :func:`comeir_dist.decode.beam.beam_search`: level 0 prefills the cache with the history
    inputs, every later level reorders the (B*K_prev)-row cache to the surviving beams and runs one backbone step on
    the input of each beam's newest code."""
    state = {}

    def step(level: int, prefixes: torch.Tensor, parent: torch.Tensor | None) -> torch.Tensor:
        b, k = prefixes.shape[:2]
        if level == 0:
            h, cache = run_backbone(backbone, x, mask, use_cache=True)
            state.update(cache=cache, mask=mask, k=1, pos=mask.long().sum(-1))
            return out[0](h[:, -1]).unsqueeze(1)
        rows = (torch.arange(b, device=parent.device).unsqueeze(1) * state["k"] + parent).reshape(-1)
        cache = state["cache"]
        cache.reorder_cache(rows)
        prev_mask, pos = state["mask"][rows], state["pos"][rows]
        new = feed(level, prefixes, b, k)
        full_mask = torch.cat([prev_mask, torch.ones(b * k, 1, dtype=torch.bool, device=new.device)], dim=1)
        h, cache = run_backbone(backbone, new, full_mask, past=cache, use_cache=True, position_offset=pos)
        state.update(cache=cache, mask=full_mask, k=k, pos=pos + 1)
        return out[level](h[:, -1]).reshape(b, k, -1)

    return step
