"""Rec2PM recurrent preference memory on the tm and item-ID SASRec baselines (issue 16;
/work/shared/papers/rec2pm-method.md).

A user's archive (``model.pref_memory.archive_items`` most recent items) is cut into segments of
``segment_items`` items. The preference memory M_{k-1} (C = ``tokens`` vectors of width d) summarises every
complete segment before the recent one; the backbone reads ``[M_{k-1}; recent segment]`` and predicts the next
item as its host does: tm generates the SID (Normal GR, KV-cached beam search), SASRec scores every item. A memory update is one backbone pass over
``[M_{k-1}; S_k; Q_mem]``: the outputs at the C query positions are m_k; overwrite: M_k = m_k, append:
M_k = [M_{k-1}; m_k].

Training (self-referential teacher forcing, :meth:`PreferenceMemory.training_loss`):

1. global reference pass over ``[S_0; Q; S_1; Q; ...; S_{K-1}; Q]`` (the complete segments) with the block mask
   of :func:`global_block_mask`: the query block after segment h sees the raw items of segments 0..h and
   (causally) itself; its outputs are m_h^ref. One pass gives every reference.
2. parallel local passes: every complete segment h gets ``[M^ref_{h-1}; S_h; Q]`` (one batch row per segment);
   its query outputs m_h^upd are pulled to m_h^ref by L_con. The recent segment gets ``[M^ref_{k-1}; S_k]`` and
   the host's next-item loss (L_AR) of the sample's target. L = L_AR + lambda L_con.

Decisions on the open points of rec2pm-method.md (each is tested in tests/unit/test_pref_memory.py):

* stop-gradient: ``stop_grad_refs`` (default on) detaches m^ref where it is the L_con TARGET, so L_con trains the
  recurrent update and never moves the references. The references as memory INPUTS of the local passes keep
  their gradient unless ``stop_grad_ref_inputs``: that path is the only one through which L_AR teaches the query
  tokens what to write (with both detached the global pass gets no gradient at all).
* masks: in the global pass raw items see only earlier raw items (never a query token: their outputs are unused
  and must not depend on the memory machinery); a query block sees all raw items of its segment and the earlier
  ones, earlier tokens of its own block (causal inside the block) and no other query block. Every token also
  sees itself, so fully padded rows stay finite. Local passes are plain causal passes (memory tokens causal too).
* positions: RoPE positions count the real tokens of each pass: local = memory 0..P-1, items P.., queries after;
  global = the running index over [S_0; Q; S_1; Q; ...]. A query block therefore sees its own segment at the
  same relative distances in both passes (RoPE is relative); earlier segments are simply further away.
* which output becomes m: the final hidden state at the query positions (after the backbone's last norm); it is
  fed back through a learnable linear read-in ``mem_in`` (stored memories are the raw m, so storage is C x d).
* Q_mem: one learnable C x d block shared by every segment (and by the global and local passes).
* appending mode: the local pass of segment h reads [m_0^ref; ...; m_{h-1}^ref] (h*C tokens, left-padded with
  masked slots in the batch) and L_con pulls m_h^upd to m_h^ref, as in overwrite mode.
* loss over items: L_AR is tm's catalog-constrained SID cross-entropy (full softmax per level, Eq. 12) or SASRec's
  cross-entropy over all items, on the sample's target only: the loop already draws every prefix of every user as a
  sample, so every item is a target once per epoch; earlier segments contribute L_con only. L_con = mean squared
  error over the C x d entries of every complete segment with a predecessor (the paper's ||.||^2 divided by C*d so
  lambda does not depend on d), averaged over a sample's segments, then over samples (0 for a sample without such a
  segment), so that L is a mean over samples like L_AR and 1..N ranks compute the same loss.
* segmentation: aligned from the user's FIRST interaction. The recent segment holds the last r =
  ((n - 1) mod segment_items) + 1 items (1..segment_items, never empty); the archive keeps r + a multiple of
  segment_items items (train/archive_samples.py trims it so), so a segment's content never changes once
  complete. Serving updates fire when a segment completes (the next item starts a new recent segment);
  ``comeir memory build`` compresses the complete segments one pass per segment.
* the first segment has no memory (M_{-1} empty, masked) in every pass; max_history is unused (the archive
  replaces it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comeir_dist.errors import UserError
from comeir_dist.model.backbone import backbone_width, run_backbone
from comeir_dist.model.baselines import GenerativeBaseline
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.pref_memory_config import PrefMemoryConfig
from comeir_dist.model.sasrec import SASRecModel


@dataclass
class MemoryBatch(HistoryBatch):
    """``items [B, s]`` = the recent segment (left-padded with -1) and a stored memory ``memory [B, P, d]`` with
    ``memory_mask [B, P]`` (False = empty slot)."""

    memory: torch.Tensor | None = None
    memory_mask: torch.Tensor | None = None


def global_block_mask(segments: int, seg: int, tokens: int) -> torch.Tensor:
    """``[T, T]`` bool (True = query row may attend to key column) of the global reference pass over
    ``[S_0; Q; ...; S_{K-1}; Q]``, T = K (seg + C); see the module docstring."""
    block = seg + tokens
    t = torch.arange(segments * block)
    seg_id, within = t // block, t % block
    is_q = within >= seg
    i, j = t.unsqueeze(1), t.unsqueeze(0)
    causal = j <= i
    item_rows = ~is_q.unsqueeze(1) & ~is_q.unsqueeze(0) & causal
    q_rows = is_q.unsqueeze(1) & ((~is_q.unsqueeze(0) & (seg_id.unsqueeze(0) <= seg_id.unsqueeze(1)))
                                  | (is_q.unsqueeze(0) & (seg_id.unsqueeze(0) == seg_id.unsqueeze(1)) & causal))
    return item_rows | q_rows


def split_archive(items: torch.Tensor, seg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``items [B, A]`` (left-padded, most recent last) -> (complete segments ``[B, K, seg]``, right-aligned: absent
    leading segments are all -1; recent segment ``[B, seg]`` left-padded). r = ((n - 1) mod seg) + 1."""
    b, a = items.shape
    n = (items >= 0).sum(-1)
    r = torch.where(n > 0, (n - 1) % seg + 1, torch.zeros_like(n))
    k = int(((n - r) // seg).max()) if b else 0
    pad = torch.full((b, 1), -1, dtype=items.dtype, device=items.device)
    src = torch.cat([pad, items], dim=1)  # column 0 = padding

    def take(cols: torch.Tensor) -> torch.Tensor:  # source columns (may be < 0 -> padding)
        return src.gather(1, (cols + 1).clamp(min=0))

    c = torch.arange(seg, device=items.device)
    recent_cols = a - seg + c.unsqueeze(0).expand(b, -1)
    recent = torch.where(c.unsqueeze(0) >= seg - r.unsqueeze(1), take(recent_cols), torch.full_like(recent_cols, -1))
    if k == 0:
        return items.new_full((b, 0, seg), -1), recent
    cc = torch.arange(k * seg, device=items.device)
    comp_cols = (a - r).unsqueeze(1) - k * seg + cc.unsqueeze(0)
    return take(comp_cols).reshape(b, k, seg), recent


class PreferenceMemory:
    """The Rec2PM machinery shared by every host model (tm: :class:`PrefMemoryTM`, item-ID SASRec:
    :class:`PrefMemorySASRec`). The host is an ``nn.Module`` with ``backbone`` and provides ``item_vectors(items)``
    (one input vector per history item, ``[..., d]``), ``_ar_forward(batch)`` (the next-item prediction of a
    :class:`MemoryBatch`, run inside autocast) and ``_ar_loss(out, batch)`` (its loss, in fp32)."""

    def _init_memory(self, pm: PrefMemoryConfig, d: int) -> None:
        self.pm = pm
        self.q_mem = nn.Parameter(torch.randn(pm.tokens, d) * 0.02)
        self.mem_in = nn.Linear(d, d)
        self.last_losses: dict = {}

    # ---- pieces -------------------------------------------------------------------------------------------
    def _queries(self, rows: int) -> torch.Tensor:
        return self.q_mem.unsqueeze(0).expand(rows, -1, -1)

    def local_pass(self, memory: torch.Tensor, memory_mask: torch.Tensor, seg_items: torch.Tensor) -> torch.Tensor:
        """One memory update per row: ``[mem_in(M); S; Q]`` -> the C query outputs ``[R, C, d]``."""
        r = seg_items.shape[0]
        x = torch.cat([self.mem_in(memory), self.item_vectors(seg_items), self._queries(r)], dim=1)
        ones = torch.ones(r, self.pm.tokens, dtype=torch.bool, device=x.device)
        mask = torch.cat([memory_mask, seg_items >= 0, ones], dim=1)
        h, _ = run_backbone(self.backbone, x, mask)
        return h[:, -self.pm.tokens:]

    def global_pass(self, segments: torch.Tensor) -> torch.Tensor:
        """Reference memories m^ref ``[B, K, C, d]`` of complete segments ``[B, K, seg]`` in one pass."""
        b, k, seg = segments.shape
        c = self.pm.tokens
        x = torch.cat([self.item_vectors(segments), self._queries(b * k).reshape(b, k, c, -1)], dim=2)
        present = segments[:, :, :1] >= 0  # complete segments are full: present iff the first item is real
        valid = torch.cat([segments >= 0, present.expand(-1, -1, c)], dim=2).reshape(b, -1)
        x = x.reshape(b, k * (seg + c), -1)
        struct = global_block_mask(k, seg, c).to(x.device)
        eye = torch.eye(struct.shape[0], dtype=torch.bool, device=x.device)
        mask4 = (struct.unsqueeze(0) & valid.unsqueeze(1)) | eye.unsqueeze(0)  # [B, T, T]
        mask4 = mask4.unsqueeze(1)
        if self.backbone.config._attn_implementation != "sdpa":  # eager: additive float mask
            mask4 = torch.zeros(mask4.shape, dtype=x.dtype, device=x.device).masked_fill(~mask4, torch.finfo(x.dtype).min)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        h = self.backbone(inputs_embeds=x, attention_mask=mask4, position_ids=pos).last_hidden_state
        return h.reshape(b, k, seg + c, -1)[:, :, seg:]

    def memory_before(self, blocks: torch.Tensor, present: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory read by segment h when segment j wrote ``blocks[:, j]`` (``[B, K, C, d]``, ``present [B, K]``):
        overwrite: block h-1; append: blocks 0..h-1 (h*C slots). h = 0: no slot."""
        b, _, c, d = blocks.shape
        if h == 0:
            return blocks.new_zeros(b, 0, d), present.new_zeros(b, 0)
        if self.pm.mode == "overwrite":
            return blocks[:, h - 1], present[:, h - 1:h].expand(-1, c)
        return blocks[:, :h].reshape(b, h * c, d), present[:, :h].repeat_interleave(c, dim=1)

    def parallel_updates(self, refs: torch.Tensor, present: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """m_h^upd ``[B, K, C, d]`` of every complete segment h from the memory built of ``refs`` (all segments in
        one batch of B*K rows; append mode left-pads the memories to (K-1)*C masked slots)."""
        b, k, seg = segments.shape
        c, d = self.pm.tokens, refs.shape[-1]
        width = c if self.pm.mode == "overwrite" else max(k - 1, 0) * c
        mems, masks = [], []
        for h in range(k):
            m, mm = self.memory_before(refs, present, h)
            gap = width - m.shape[1]
            mems.append(torch.cat([m.new_zeros(b, gap, d), m], dim=1))
            masks.append(torch.cat([mm.new_zeros(b, gap), mm], dim=1))
        mem = torch.stack(mems, 1).reshape(b * k, width, d)
        mmask = torch.stack(masks, 1).reshape(b * k, width)
        return self.local_pass(mem, mmask, segments.reshape(b * k, seg)).reshape(b, k, c, d)

    def compress(self, items: torch.Tensor):
        """Sequential serving computation: (M ``[B, P, d]``, its mask, recent segment ``[B, seg]``); one local pass
        per complete segment. Also returns the blocks m_h ``[B, K, C, d]`` (for tests)."""
        segments, recent = split_archive(items, self.pm.segment_items)
        b, k, _ = segments.shape
        d = self.q_mem.shape[1]
        present = segments[:, :, 0] >= 0
        mem, mmask = self.q_mem.new_zeros(b, 0, d), present.new_zeros(b, 0)
        blocks = []
        for h in range(k):
            new = self.local_pass(mem, mmask, segments[:, h])
            blocks.append(new)
            p = present[:, h]
            newmask = p.unsqueeze(1).expand(-1, self.pm.tokens)
            if self.pm.mode == "overwrite":
                if mem.shape[1] == 0:
                    mem, mmask = torch.where(p[:, None, None], new, new.new_zeros(())), newmask
                else:
                    mem = torch.where(p[:, None, None], new, mem)
                    mmask = mmask | newmask
            else:
                mem, mmask = torch.cat([mem, new], dim=1), torch.cat([mmask, newmask], dim=1)
        stacked = torch.stack(blocks, 1) if blocks else self.q_mem.new_zeros(b, 0, self.pm.tokens, d)
        return mem, mmask, recent, stacked

    # ---- inputs of the prediction pass ---------------------------------------------------------------------
    def memory_inputs(self, batch: HistoryBatch):
        """(backbone inputs ``[mem_in(M); recent items]``, their mask, the recent item vectors): M from the batch
        (stored memories, :class:`MemoryBatch`) or compressed from its archive."""
        if getattr(batch, "memory", None) is not None:
            mem, mmask, recent = batch.memory, batch.memory_mask, batch.items
        else:
            mem, mmask, recent, _ = self.compress(batch.items)
        items = self.item_vectors(recent)
        x = torch.cat([self.mem_in(mem.to(items.dtype)), items], dim=1)
        return x, torch.cat([mmask, recent >= 0], dim=1), items

    # ---- training: self-referential teacher forcing ----------------------------------------------------------
    def training_loss(self, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
        pm = self.pm
        with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=bf16):
            segments, recent = split_archive(batch.items, pm.segment_items)
            b, k, _ = segments.shape
            present = segments[:, :, 0] >= 0
            refs = self.global_pass(segments) if k else self.q_mem.new_zeros(b, 0, pm.tokens, self.q_mem.shape[1])
            ref_in = refs.detach() if pm.stop_grad_ref_inputs else refs
            mem, mmask = self.memory_before(ref_in, present, k)
            mb = MemoryBatch(recent, batch.target, mem, mmask)
            out = self._ar_forward(mb)
            l_con = refs.new_zeros(())
            if k > 1 and pm.align_weight > 0:
                upd = self.parallel_updates(ref_in, present, segments)
                target = refs.detach() if pm.stop_grad_refs else refs
                valid = (present[:, 1:] & present[:, :-1]).to(upd.dtype)  # segments with a predecessor
                err = (target[:, 1:].float() - upd[:, 1:].float()).pow(2).mean(dim=(-1, -2))  # [B, K-1]
                # per sample: mean over its segments with a predecessor (0 without); then the mean over samples,
                # like L_AR -- a per-sample mean is the same loss however the batch is split over ranks
                per_sample = (err * valid).sum(-1) / valid.sum(-1).clamp(min=1)
                l_con = per_sample.mean()
        l_ar = self._ar_loss(out, mb)
        self.last_losses = {"ar": float(l_ar.detach()), "con": float(l_con.detach())}
        return l_ar + pm.align_weight * l_con


class PrefMemoryTM(PreferenceMemory, GenerativeBaseline):
    """tm with a recurrent preference memory (Rec2PM); see the module docstring."""

    def __init__(self, catalog, codebooks: torch.Tensor, backbone: nn.Module, token_dim: int, pm: PrefMemoryConfig,
                 window: int = 4, fusion: str = "concat"):
        GenerativeBaseline.__init__(self, "tm", catalog, codebooks, backbone, token_dim, decoding="normal",
                                    window=window, fusion=fusion)
        self._init_memory(pm, self.merge.out_features)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.merge(self.tokens(self.catalog.item_codes(items)).flatten(-2))

    def _inputs(self, batch: HistoryBatch, with_items: bool = True):  # used by level_logits and the decoder
        x, mask, items = self.memory_inputs(batch)
        return x, mask, items, None

    def _ar_forward(self, batch: MemoryBatch):
        codes = self.catalog.item_codes(batch.target)
        return self.level_logits(batch, codes), codes

    def _ar_loss(self, out, batch: MemoryBatch) -> torch.Tensor:
        from comeir_dist.model.loss import constrained_sid_loss

        logits, codes = out
        return constrained_sid_loss(logits, codes, self.trie)


class PrefMemorySASRec(PreferenceMemory, SASRecModel):
    """The item-ID SASRec baseline with a recurrent preference memory: the memory passes read the (input-dropout)
    item embeddings, the prediction pass reads ``[mem_in(M); recent segment]`` and scores every item with the
    tied item table (model/sasrec.py)."""

    def __init__(self, num_items: int, backbone: nn.Module, pm: PrefMemoryConfig, dropout: float = 0.0):
        SASRecModel.__init__(self, num_items, backbone, dropout=dropout)
        self._init_memory(pm, backbone_width(backbone))

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.items(items))

    def user_state(self, batch: HistoryBatch) -> torch.Tensor:
        x, mask, _ = self.memory_inputs(batch)
        h, _ = run_backbone(self.backbone, x, mask)
        return h[:, -1]

    def _ar_forward(self, batch: MemoryBatch):
        return self.item_logits(batch)

    def _ar_loss(self, out, batch: MemoryBatch) -> torch.Tensor:
        return F.cross_entropy(out.float(), batch.target)


def build_pref_memory_model(cfg, codes, codebooks, item_emb) -> nn.Module:
    """``model.pref_memory.enabled``: tm or sasrec + Rec2PM memory; other variants / decodings are refused in one
    line."""
    from comeir_dist.decode.trie import PrefixTrie
    from comeir_dist.model.backbone import build_backbone
    from comeir_dist.model.history import Catalog

    m = cfg.model
    if m.variant not in ("tm", "sasrec"):
        raise UserError(f"model.pref_memory.enabled applies to model.variant: tm or sasrec (one input vector per "
                        f"item), not {m.variant}; set model.pref_memory.enabled: false or another model.variant")
    if m.decoding != "normal" or m.decor.compose:
        raise UserError("model.pref_memory.enabled needs model.decoding: normal and model.decor.compose: false")
    if m.variant == "sasrec":
        return PrefMemorySASRec(codes.shape[0], build_backbone(m.backbone), m.pref_memory, dropout=m.backbone.dropout)
    levels, size = codebooks.shape[0], codebooks.shape[1]
    if (levels, size) != (cfg.engram.levels, cfg.engram.codebook_size):
        raise UserError(f"SID table has L={levels}, C={size} but config engram.levels={cfg.engram.levels}, "
                        f"engram.codebook_size={cfg.engram.codebook_size}")
    codes_t = torch.as_tensor(codes, dtype=torch.long)
    catalog = Catalog(codes_t, torch.as_tensor(item_emb, dtype=torch.float32))
    model = PrefMemoryTM(catalog, torch.as_tensor(codebooks, dtype=torch.float32), build_backbone(m.backbone),
                         m.token_dim, m.pref_memory, window=m.window, fusion=m.token_fusion)
    model.trie = PrefixTrie.from_codes(codes_t, size)
    return model
