"""Activations the memory plan cannot cover with its fixed reserve: the Rec2PM global reference pass and
all-position training (:func:`sequence_activations`); :func:`run_activations` gives those that apply to a run.

With ``model.pref_memory.enabled`` the training step runs one backbone pass over every complete segment of each
archive, ``T = K (segment_items + tokens)`` positions with ``K = (archive_items - 1) // segment_items`` (the
recent segment holds 1..segment_items items, model/pref_memory.py), under a ``[B, T, T]`` block mask. It grows
with the SQUARE of the archive, unlike the fixed ``parallel.reserve_gib``. Estimate per rank (B = one
micro-batch, ``ceil(batch_size / grad_accum_steps / world)`` as the loop uses):

* the mask: ``B T^2`` bytes (bool; the SDPA backbone takes it as is);
* per layer, the attention scores and probabilities autograd keeps for backward: ``2 B H T^2 e`` bytes
  (H heads, e = 2 under bf16, else 4). Fused (flash / memory-efficient) kernels keep less; the plan assumes
  the math path, which is what CPU runs and what a custom block mask often falls back to.

Pure arithmetic (no model is built); the backbone's layers / heads come from ``model.backbone`` or the config
file / local checkpoint it names, as ``count_dense_params`` reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GlobalPassActivations:
    positions: int  # T
    micro_batch: int  # B per rank
    layers: int
    heads: int
    mask_bytes: int
    attention_bytes: int

    remedy = "a shorter model.pref_memory.archive_items (the global pass is quadratic in the archive)"

    @property
    def total(self) -> int:
        return self.mask_bytes + self.attention_bytes

    def describe(self) -> str:
        return (f"Rec2PM global pass: T={self.positions} positions x micro-batch {self.micro_batch}, "
                f"{self.layers} layers x {self.heads} heads: mask {self.mask_bytes / 2**30:.2f} GiB + attention "
                f"{self.attention_bytes / 2**30:.2f} GiB per rank")


def _width(bb) -> int:
    """Hidden size of ``model.backbone``: its size, or the HF config it names."""
    if bb.path or bb.config_file:
        from comeir_dist.parallel.memory_plan import backbone_hf_config

        return int(backbone_hf_config(bb)[0].hidden_size)
    return int(bb.hidden_size)


def _layers_heads(bb) -> tuple[int, int]:
    """(layers, attention heads) of ``model.backbone``: its sizes, or the HF config it names."""
    if bb.path or bb.config_file:
        from comeir_dist.parallel.memory_plan import backbone_hf_config

        conf = backbone_hf_config(bb)[0]
        return int(conf.num_hidden_layers), int(conf.num_attention_heads)
    return int(bb.num_layers), int(bb.num_heads)


def global_pass_activations(cfg, world: int) -> GlobalPassActivations | None:
    """The estimate above for run config ``cfg`` on ``world`` ranks; None without ``model.pref_memory``."""
    pm = cfg.model.pref_memory
    if not pm.enabled:
        return None
    k = max(0, (pm.archive_items - 1) // pm.segment_items)
    t = k * (pm.segment_items + pm.tokens)
    b = math.ceil(cfg.train.batch_size / cfg.train.grad_accum_steps / max(1, world))
    layers, heads = _layers_heads(cfg.model.backbone)
    elt = 2 if cfg.train.bf16 else 4
    return GlobalPassActivations(t, b, layers, heads, b * t * t, 2 * layers * b * heads * t * t * elt)


@dataclass(frozen=True)
class SequenceActivations:
    """All-position training (``train.sample_mode: sequence``): per window of W positions the ``[W, I]`` logits
    over the catalog (flatten, tm, comeir: ``[W*L, C]``, each target's L levels over one level's C codes; comeir
    adds its head's ``[W*C, d]`` pair states at level 1) (fp32 logits, softmax kept for backward,
    their gradient: 3 x 4 bytes each) and, without the preference memory, the window's attention
    (``2 L B H T^2 e`` over its T tokens, as the global pass above; with the memory the global pass term already covers
    the long pass and the local passes are short)."""

    window: int  # backbone tokens per window: W positions (flatten, tm: W*L)
    micro_batch: int
    num_items: int  # scored classes per position (flatten: the codebook size)
    logits_bytes: int
    attention_bytes: int

    remedy = "a shorter window (max_history, or model.pref_memory.archive_items with the memory)"

    @property
    def total(self) -> int:
        return self.logits_bytes + self.attention_bytes

    def describe(self) -> str:
        return (f"all-position training: {self.micro_batch} windows x {self.window} positions x {self.num_items} "
                f"items: logits {self.logits_bytes / 2**30:.2f} GiB + attention {self.attention_bytes / 2**30:.2f} "
                f"GiB per rank")


# [pairs, d] tensors the memory head keeps per (target, candidate) pair for backward: W_H zeta + W_C e_x, the two
# projected reads, the LayerNorm's input and output (memory_head.py)
HEAD_PAIR_TENSORS = 6


def sequence_activations(cfg, world: int, num_items: int) -> SequenceActivations | None:
    """The all-position estimate for run config ``cfg``; None in prefix mode."""
    if cfg.train.sample_mode != "sequence":
        return None
    pm = cfg.model.pref_memory
    w = pm.archive_items if pm.enabled else cfg.max_history
    b = math.ceil(cfg.train.batch_size / cfg.train.grad_accum_steps / max(1, world))
    variant, levels, codes = cfg.model.variant, cfg.engram.levels, cfg.engram.codebook_size
    if variant == "sasrec":  # one input per item, every position scores every item
        tokens, logits = w, 3 * 4 * b * w * int(num_items)
    else:  # every target scores L levels x C codes
        logits = 3 * 4 * b * w * levels * codes
        # flatten: L tokens per item; tm: 1 input + L-1 fed-back codes per position (code_sequence.py); comeir: one
        # input per item, and its head holds a [d] state per (target, code) pair at level 1 (every code is valid)
        tokens = w if variant == "comeir" else w * levels
        if variant == "comeir":
            logits += HEAD_PAIR_TENSORS * 4 * b * w * codes * _width(cfg.model.backbone)
    attention = 0
    if not pm.enabled:
        layers, heads = _layers_heads(cfg.model.backbone)
        attention = 2 * layers * b * heads * tokens * tokens * (2 if cfg.train.bf16 else 4)
    return SequenceActivations(tokens, b, codes if variant != "sasrec" else int(num_items), logits, attention)


@dataclass(frozen=True)
class Activations:
    """The estimates that apply to a run, added together to the plan's reserve."""

    parts: tuple

    @property
    def total(self) -> int:
        return sum(p.total for p in self.parts)

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.parts)

    @property
    def remedy(self) -> str:
        return " or ".join(p.remedy for p in self.parts)


def run_activations(cfg, world: int, num_items: int = 0) -> Activations | None:
    """Every activation estimate of this module that applies to ``cfg`` (None when none does); a
    ``train.sample_mode: auto`` config is estimated as its variant trains (config.run.resolve_sample_mode)."""
    from comeir_dist.config.run import resolve_sample_mode

    cfg = resolve_sample_mode(cfg)
    parts = tuple(p for p in (global_pass_activations(cfg, world), sequence_activations(cfg, world, num_items))
                  if p is not None)
    return Activations(parts) if parts else None
