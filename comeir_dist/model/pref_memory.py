"""Rec2PM recurrent preference memory on tm, the item-ID SASRec baseline and ComeIR (issue 16;
/work/shared/papers/rec2pm-method.md).

A user's archive (``model.pref_memory.archive_items`` most recent items) is cut into segments of
``segment_items`` items. The preference memory M_{k-1} (C = ``tokens`` vectors of width d) summarises every
complete segment before the recent one; the backbone reads ``[M_{k-1}; recent segment]`` and predicts the next
item as its host does: tm generates the SID (Normal GR, KV-cached beam search), SASRec scores every item, ComeIR
decodes with its memory-restoring head (:class:`PrefMemoryComeIR` for its segment-boundary rule). A memory update
is one backbone pass over ``[M_{k-1}; S_k; Q_mem]``: the outputs at the C query positions are m_k; overwrite:
M_k = m_k, append: M_k = [M_{k-1}; m_k].

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

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comeir_dist.errors import UserError
from comeir_dist.model.backbone import attention_mask_for, backbone_width, run_backbone
from comeir_dist.model.baselines import GenerativeBaseline
from comeir_dist.model.comeir import ComeIRModel
from comeir_dist.model.comeir_encoder import EncoderMemoryOptions
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.pref_memory_config import PrefMemoryConfig
from comeir_dist.model.sasrec import SASRecModel


APPEND_GROUP = 8
"""Append mode: segments per batch of local passes (each group pads its memories to its own largest, h*C slots)."""


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


def split_archive(items: torch.Tensor, seg: int, context: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``items [B, A]`` (left-padded, most recent last) -> (complete segments ``[B, K, context + seg]``, right-aligned:
    absent leading segments are all -1; recent segment ``[B, context + seg]`` left-padded). r = ((n - 1) mod seg) + 1.
    ``context`` > 0: every segment is preceded by the ``context`` items before it (-1 where the archive has none), so a
    host whose item vectors depend on preceding items (comeir's n-gram keys) encodes a segment as in the full
    history. Context positions are not part of the segment and are marked: item i is stored as ``-2 - i``
    (:func:`context_items_decoded` restores it; -1 stays padding), so ``>= 0`` still selects a segment's own items
    -- in the recent row the context sits right before its 1..seg items, inside the last ``seg`` columns."""
    b, a = items.shape
    n = (items >= 0).sum(-1)
    r = torch.where(n > 0, (n - 1) % seg + 1, torch.zeros_like(n))
    k = int(((n - r) // seg).max()) if b else 0
    pad = torch.full((b, 1), -1, dtype=items.dtype, device=items.device)
    src = torch.cat([pad, items], dim=1)  # column 0 = padding

    def take(cols: torch.Tensor) -> torch.Tensor:  # source columns (may be < 0 -> padding)
        return src.gather(1, (cols + 1).clamp(min=0))

    w = context + seg
    c = torch.arange(w, device=items.device)
    recent_cols = a - w + c.unsqueeze(0).expand(b, -1)
    recent = torch.where(c.unsqueeze(0) >= seg - r.unsqueeze(1), take(recent_cols), torch.full_like(recent_cols, -1))
    recent = _mark(recent, c.unsqueeze(0) < (w - r).unsqueeze(1))
    if k == 0:
        return items.new_full((b, 0, w), -1), recent
    h = torch.arange(k, device=items.device)
    start = (a - r).unsqueeze(1) - (k - h.unsqueeze(0)) * seg  # [B, K] first column of segment h
    cols = start.unsqueeze(-1) - context + c  # [B, K, w]
    return _mark(take(cols.reshape(b, -1)).reshape(b, k, w), c < context), recent


def _mark(items: torch.Tensor, is_context: torch.Tensor) -> torch.Tensor:
    """Context positions hold ``-2 - item`` (see :func:`split_archive`)."""
    return torch.where(is_context & (items >= 0), -2 - items, items)


def context_items_decoded(items: torch.Tensor) -> torch.Tensor:
    """The item ids of a :func:`split_archive` row with its context positions restored (padding stays -1)."""
    return torch.where(items <= -2, -2 - items, items)


class PreferenceMemory:
    """The Rec2PM machinery shared by every host model (tm: :class:`PrefMemoryTM`, item-ID SASRec:
    :class:`PrefMemorySASRec`, comeir: :class:`PrefMemoryComeIR`). The host is an ``nn.Module`` with ``backbone``
    and provides ``item_vectors(items [R, N]) -> [R, N, d]`` (one input vector per item position) and
    ``_ar_forward(batch)``, or overrides ``_prepare(segments [R, context + seg], recent: MemoryBatch) -> (segment
    vectors [R, seg, d], predict(memory, memory_mask) -> out)`` (comeir: one lookup pass for both); ``_ar_loss(out,
    batch)`` is the SID loss unless the host overrides it.
    ``context_items``: items before every segment the host's item vectors need (comeir: its n-gram keys and window;
    0 for tm / sasrec)."""

    context_items = 0

    def _init_memory(self, pm: PrefMemoryConfig, d: int) -> None:
        self.pm = pm
        self.q_mem = nn.Parameter(torch.randn(pm.tokens, d) * 0.02)
        self.mem_in = nn.Linear(d, d)
        self.last_losses: dict = {}

    # ---- pieces -------------------------------------------------------------------------------------------
    def _queries(self, rows: int) -> torch.Tensor:
        return self.q_mem.unsqueeze(0).expand(rows, -1, -1)

    def segment_vectors(self, seg_items: torch.Tensor) -> torch.Tensor:
        """Item vectors ``[R, seg, d]`` of segments given with their context ``[R, context + seg]``."""
        return self.item_vectors(seg_items)[:, self.context_items:]

    def _prepare(self, segments: torch.Tensor, recent: "MemoryBatch"):
        """Default (hosts whose item vectors need no lookups): segment vectors now, the prediction later."""
        vecs = self.segment_vectors(segments)
        return vecs, lambda mem, mmask: self._ar_forward(dataclasses.replace(recent, memory=mem, memory_mask=mmask))

    def local_pass(self, memory: torch.Tensor, memory_mask: torch.Tensor, seg_vecs: torch.Tensor,
                   seg_valid: torch.Tensor, item_states: bool = False):
        """One memory update per row: ``[mem_in(M); S; Q]`` -> the C query outputs ``[R, C, d]`` (and, with
        ``item_states``, the states at the segment's positions ``[R, seg, d]``: causal, so they never see Q)."""
        r, seg = seg_vecs.shape[:2]
        x = torch.cat([self.mem_in(memory), seg_vecs, self._queries(r)], dim=1)
        ones = torch.ones(r, self.pm.tokens, dtype=torch.bool, device=x.device)
        mask = torch.cat([memory_mask, seg_valid, ones], dim=1)
        h, _ = run_backbone(self.backbone, x, mask)
        queries = h[:, -self.pm.tokens:]
        if not item_states:
            return queries
        return queries, h[:, memory.shape[1]:memory.shape[1] + seg]

    def update(self, memory: torch.Tensor, memory_mask: torch.Tensor, seg_items: torch.Tensor) -> torch.Tensor:
        """Serving: the memory block m_k ``[R, C, d]`` written by one completed segment ``[R, context + seg]``."""
        return self.local_pass(memory, memory_mask, self.segment_vectors(seg_items),
                               seg_items[:, self.context_items:] >= 0)

    def global_pass(self, seg_vecs: torch.Tensor, seg_valid: torch.Tensor) -> torch.Tensor:
        """Reference memories m^ref ``[B, K, C, d]`` of complete segments (vectors ``[B, K, seg, d]``, validity
        ``[B, K, seg]``) in one pass."""
        b, k, seg, _ = seg_vecs.shape
        c = self.pm.tokens
        x = torch.cat([seg_vecs, self._queries(b * k).reshape(b, k, c, -1)], dim=2)
        present = seg_valid[:, :, :1]  # complete segments are full: present iff the first item is real
        valid = torch.cat([seg_valid, present.expand(-1, -1, c)], dim=2).reshape(b, -1)
        x = x.reshape(b, k * (seg + c), -1)
        struct = global_block_mask(k, seg, c).to(x.device)
        eye = torch.eye(struct.shape[0], dtype=torch.bool, device=x.device)
        mask4 = (struct.unsqueeze(0) & valid.unsqueeze(1)) | eye.unsqueeze(0)  # [B, T, T]
        mask4 = mask4.unsqueeze(1)
        mask4 = attention_mask_for(self.backbone, mask4, x.dtype)
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

    def parallel_updates(self, refs: torch.Tensor, present: torch.Tensor, seg_vecs: torch.Tensor,
                         seg_valid: torch.Tensor, item_states: bool = False):
        """m_h^upd ``[B, K, C, d]`` of every segment h of ``seg_vecs`` from the memory built of ``refs`` (the
        segments' rows batched together). ``seg_vecs`` may hold one segment more than ``refs`` (the recent one, in
        all-position training); ``item_states`` also returns the states at every segment position ``[B, K, seg, d]``.

        Overwrite mode: every row reads C slots, so all K segments go in one batch of B*K rows. Append mode: segment
        h reads h*C slots; rather than padding every row to (K-1)*C, the segments go in groups of
        :data:`APPEND_GROUP` consecutive h, each left-padded only to its own largest memory (masked slots and RoPE
        positions that count real tokens only: the same outputs)."""
        k = seg_vecs.shape[1]
        group = max(k, 1) if self.pm.mode == "overwrite" else APPEND_GROUP
        parts = [self._updates_of(refs, present, seg_vecs, seg_valid, range(h0, min(h0 + group, k)), item_states)
                 for h0 in range(0, k, group)]
        if not item_states:
            return torch.cat(parts, dim=1)
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _updates_of(self, refs: torch.Tensor, present: torch.Tensor, seg_vecs: torch.Tensor, seg_valid: torch.Tensor,
                    hs: range, item_states: bool):
        """:meth:`parallel_updates` for the segments ``hs`` (consecutive), in one batch of B*len(hs) rows."""
        b, _, seg, _ = seg_vecs.shape
        n = len(hs)
        c, d = self.pm.tokens, refs.shape[-1]
        width = c if self.pm.mode == "overwrite" else hs[-1] * c
        mems, masks = [], []
        for h in hs:
            m, mm = self.memory_before(refs, present, h)
            gap = width - m.shape[1]
            mems.append(torch.cat([m.new_zeros(b, gap, d), m], dim=1))
            masks.append(torch.cat([mm.new_zeros(b, gap), mm], dim=1))
        mem = torch.stack(mems, 1).reshape(b * n, width, d)
        mmask = torch.stack(masks, 1).reshape(b * n, width)
        sv = seg_vecs[:, hs.start:hs.stop]
        out = self.local_pass(mem, mmask, sv.reshape(b * n, seg, -1), seg_valid[:, hs.start:hs.stop].reshape(b * n, seg),
                              item_states=item_states)
        if not item_states:
            return out.reshape(b, n, c, d)
        return out[0].reshape(b, n, c, d), out[1].reshape(b, n, seg, -1)

    def _split(self, items: torch.Tensor):
        """(segments ``[B, K, context + seg]``, recent ``[B, context + seg]``, segments' own items ``[B, K, seg]``)."""
        segments, recent = split_archive(items, self.pm.segment_items, self.context_items)
        return segments, recent, segments[:, :, self.context_items:]

    def compress(self, items: torch.Tensor):
        """Sequential serving computation: (M ``[B, P, d]``, its mask, recent segment ``[B, context + seg]``); one
        local pass per complete segment (the segments' item vectors in one call). Also returns the blocks m_h
        ``[B, K, C, d]`` (for tests)."""
        segments, recent, own = self._split(items)
        b, k, _ = segments.shape
        d = self.q_mem.shape[1]
        vecs = self.segment_vectors(segments.reshape(b * k, segments.shape[-1])).reshape(b, k, own.shape[-1], d)
        present = own[:, :, 0] >= 0
        mem, mmask = self.q_mem.new_zeros(b, 0, d), present.new_zeros(b, 0)
        blocks = []
        for h in range(k):
            new = self.local_pass(mem, mmask, vecs[:, h], own[:, h] >= 0)
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
    def memory_of(self, batch: HistoryBatch):
        """(M, its mask, recent segment): stored in the batch (:class:`MemoryBatch`) or compressed from its archive."""
        if getattr(batch, "memory", None) is not None:
            return batch.memory, batch.memory_mask, batch.items
        return self.compress(batch.items)[:3]

    def memory_inputs(self, batch: HistoryBatch):
        """(backbone inputs ``[mem_in(M); recent items]``, their mask, the recent item vectors)."""
        mem, mmask, recent = self.memory_of(batch)
        items = self.segment_vectors(recent)
        x = torch.cat([self.mem_in(mem.to(items.dtype)), items], dim=1)
        return x, torch.cat([mmask, recent[:, self.context_items:] >= 0], dim=1), items

    # ---- training: self-referential teacher forcing ----------------------------------------------------------
    def _ar_loss(self, out, batch: "MemoryBatch") -> torch.Tensor:
        """L_AR of the SID hosts (tm, comeir): ``out = (level logits, target codes)``; sasrec overrides it."""
        from comeir_dist.model.loss import constrained_sid_loss

        logits, codes = out
        return constrained_sid_loss(logits, codes, self.trie)

    def _segment_errors(self, refs: torch.Tensor, upd: torch.Tensor, present: torch.Tensor):
        """(MSE between m_h^upd and m_h^ref ``[B, K-1]`` for segments 1..K-1, their validity: complete with a
        predecessor). ``stop_grad_refs`` detaches the references as targets."""
        target = refs.detach() if self.pm.stop_grad_refs else refs
        valid = (present[:, 1:] & present[:, :-1]).to(upd.dtype)
        err = (target[:, 1:].float() - upd[:, 1:].float()).pow(2).mean(dim=(-1, -2))
        return err * valid, valid

    def _consistency(self, refs: torch.Tensor, upd: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """L_con: MSE between m_h^upd and m_h^ref of every complete segment with a predecessor; per sample the mean
        over such segments (0 without), then the mean over samples -- like L_AR, a per-sample mean is the same loss
        however the batch is split over ranks."""
        err, valid = self._segment_errors(refs, upd, present)
        return (err.sum(-1) / valid.sum(-1).clamp(min=1)).mean()

    def _sequence_consistency(self, refs: torch.Tensor, upd: torch.Tensor, present: torch.Tensor,
                              seg_targets: torch.Tensor, width: int) -> torch.Tensor:
        """L_con of all-position training, weighted as in prefix training: the prefix sample of a target in segment h
        (complete segments 0..h-1) has L_con = the mean error over segments 1..h-1 with a predecessor; the window sums
        that over its targets (``seg_targets [B, K + 1]`` targets per segment, the recent one last) and divides by the
        window ``width``, like :meth:`sequence_loss`. So L_AR + lambda L_con of a window equals the sum of its prefix
        samples' losses (tested). A plain per-window mean instead weighs L_con ~width / targets times more than prefix
        training does (~7x on 1,000-item MovieLens windows holding ~143 targets)."""
        err, valid = self._segment_errors(refs, upd, present)
        mean_before = err.new_zeros(seg_targets.shape)  # [B, K + 1]: mean error over segments 1..h-1
        mean_before[:, 2:] = err.cumsum(-1) / valid.cumsum(-1).clamp(min=1)
        return ((mean_before * seg_targets.to(err.dtype)).sum(-1) / width).mean()

    def training_loss(self, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
        if batch.target.dim() == 2:
            return self.sequence_training_loss(batch, bf16)
        pm = self.pm
        with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=bf16):
            segments, recent, own = self._split(batch.items)
            b, k, seg = own.shape
            rb = MemoryBatch(recent, batch.target)
            vecs, predict = self._prepare(segments.reshape(b * k, segments.shape[-1]), rb)
            vecs = vecs.reshape(b, k, seg, self.q_mem.shape[1])
            seg_valid = own >= 0
            present = seg_valid[:, :, 0]
            refs = (self.global_pass(vecs, seg_valid) if k
                    else self.q_mem.new_zeros(b, 0, pm.tokens, self.q_mem.shape[1]))
            ref_in = refs.detach() if pm.stop_grad_ref_inputs else refs
            mem, mmask = self.memory_before(ref_in, present, k)
            out = predict(mem, mmask)
            l_con = refs.new_zeros(())
            if k > 1 and pm.align_weight > 0:
                l_con = self._consistency(refs, self.parallel_updates(ref_in, present, vecs, seg_valid), present)
        l_ar = self._ar_loss(out, rb)
        self.last_losses = {"ar": float(l_ar.detach()), "con": float(l_con.detach())}
        return l_ar + pm.align_weight * l_con

    def sequence_training_loss(self, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
        """All-position training (``train.sample_mode: sequence``; hosts with ``sequence_loss``: sasrec): a window
        ``items [B, A]`` with the next item at every position ``target [B, A]``. The global pass gives m^ref of
        every complete segment; ONE batch of local passes ``[M^ref_{h-1}; S_h; Q]`` over every segment h, the recent
        one included, gives both m_h^upd (L_con, as in prefix training) and the causal states at every item
        position, which score the next item (L_AR over the window). The global pass is causal over segments, so the
        state at position i equals the prefix sample (window[:i+1], target[i]) of prefix training (tested)."""
        pm = self.pm
        with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=bf16):
            segments, recent, own = self._split(batch.items)
            seg_t, recent_t = split_archive(batch.target, pm.segment_items)  # same validity -> same segmentation
            b, k, seg = own.shape
            d = self.q_mem.shape[1]
            vecs = self.segment_vectors(segments.reshape(b * k, segments.shape[-1])).reshape(b, k, seg, d)
            seg_valid = own >= 0
            present = seg_valid[:, :, 0]
            refs = self.global_pass(vecs, seg_valid) if k else self.q_mem.new_zeros(b, 0, pm.tokens, d)
            ref_in = refs.detach() if pm.stop_grad_ref_inputs else refs
            all_vecs = torch.cat([vecs, self.segment_vectors(recent).unsqueeze(1)], dim=1)
            all_valid = torch.cat([seg_valid, (recent[:, self.context_items:] >= 0).unsqueeze(1)], dim=1)
            upd, states = self.parallel_updates(ref_in, present, all_vecs, all_valid, item_states=True)
        seg_targets = torch.cat([seg_t, recent_t.unsqueeze(1)], dim=1)  # [B, k + 1, seg]
        l_con = (self._sequence_consistency(refs, upd[:, :k], present, (seg_targets >= 0).sum(-1), batch.items.shape[1])
                 if k > 1 and pm.align_weight > 0 else refs.new_zeros(()))
        targets = seg_targets.reshape(b, -1)
        l_ar = self.sequence_loss(states.reshape(b, (k + 1) * seg, d), targets, batch.items.shape[1], bf16)
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


class PrefMemoryComeIR(PreferenceMemory, ComeIRModel):
    """ComeIR with a recurrent preference memory (Normal GR). Decisions beyond the tm host:

    * segment boundaries: every segment -- complete or recent -- is encoded with the ``context_items`` =
      max(largest inter n-gram order - 1, window - 1) items before it, so its first items' n-gram keys and window
      attention see the real preceding items exactly as in the full history; the context positions' vectors are
      dropped (those items belong to the previous segment, already in the memory). The memory-restoring head reads
      the recent segment WITH its context: the candidate keys and the decode query over the last ``window`` items
      are those of the full history even when the recent segment holds one item.
    * one Engram lookup pass per forward: training encodes every complete segment and the recent segment in one
      encoder call (the head's teacher-forced keys registered in the same pass), serving (``compress``) encodes
      all segments in one call; so every rank makes the same collective table calls whatever its histories
      (an empty set of segments still makes the call, with one padding row).
    """

    def __init__(self, pm: PrefMemoryConfig, *args, **kwargs):
        ComeIRModel.__init__(self, *args, **kwargs)
        self._init_memory(pm, backbone_width(self.backbone))
        longest = max(o for l in range(1, self.levels + 1) for o in self.lookup.orders("inter", l) or [1])
        self.context_items = max(longest - 1, self.head.window - 1, 0)

    def segment_vectors(self, seg_items: torch.Tensor) -> torch.Tensor:
        rows = seg_items if seg_items.shape[0] else seg_items.new_full((1, seg_items.shape[1]), -1)
        r = self.encoder_pass(context_items_decoded(rows))["r"][:, self.context_items:]
        return r[: seg_items.shape[0]]

    def _with_memory(self, enc: dict, mem: torch.Tensor, mmask: torch.Tensor, recent: torch.Tensor) -> dict:
        """The backbone over ``[mem_in(M); recent segment]`` (the last ``seg`` columns of ``recent``, context items
        masked): ``h`` of the last position."""
        c = self.context_items
        r = enc["r"]
        x = torch.cat([self.mem_in(mem.to(r.dtype)), r[:, c:]], dim=1)
        h, _ = run_backbone(self.backbone, x, torch.cat([mmask, recent[:, c:] >= 0], dim=1))
        return dict(enc, h=h[:, -1])

    def _encode(self, batch: HistoryBatch, extra_requests=None):
        mem, mmask, recent = self.memory_of(batch)
        enc = self.encoder_pass(context_items_decoded(recent), extra_requests)  # the head sees the context too
        return self._with_memory(enc, mem, mmask, recent)

    def _prepare(self, segments: torch.Tensor, recent: MemoryBatch):
        n = segments.shape[0]
        codes = self.catalog.item_codes(recent.target)
        head = self.head_requests(codes)
        enc = self.encoder_pass(context_items_decoded(torch.cat([segments, recent.items])),
                                lambda lp, units, mask: head(lp, [u[n:] for u in units], mask[n:]))
        vecs = enc["r"][:n, self.context_items:]

        def predict(mem, mmask):
            e = dict(r=enc["r"][n:], mask=enc["mask"][n:], s0=enc["s0"][n:])
            e = self._with_memory(e, mem, mmask, recent.items)
            logits = [self.head.logits(enc["lp"], req, e["h"], e["s0"], e["mask"],
                                       self.tokens.level_table(req.level - 1))[:, 0] for req in enc["extra"]]
            return logits, codes

        return vecs, predict


def build_pref_memory_model(cfg, codes, codebooks, item_emb, sparse_device="cpu") -> nn.Module:
    """``model.pref_memory.enabled``: tm, sasrec or comeir + Rec2PM memory (Normal GR); anything else is refused in
    one line."""
    from comeir_dist.decode.trie import PrefixTrie
    from comeir_dist.model.backbone import build_backbone
    from comeir_dist.model.history import Catalog

    m = cfg.model
    if m.variant not in ("tm", "sasrec", "comeir"):
        raise UserError(f"model.pref_memory.enabled applies to model.variant: tm, sasrec or comeir (one input vector "
                        f"per item), not {m.variant}; set model.pref_memory.enabled: false or another model.variant")
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
    cb = torch.as_tensor(codebooks, dtype=torch.float32)
    trie = PrefixTrie.from_codes(codes_t, size)
    if m.variant == "comeir":
        return PrefMemoryComeIR(m.pref_memory, cfg.engram, catalog, cb, build_backbone(m.backbone), trie, m.token_dim,
                                m.window, set(m.ablations), sparse_device=sparse_device,
                                head_interaction=m.head_interaction, memory_dropout=m.memory_dropout,
                                head_memory_grad=m.head_memory_grad, fusion=m.token_fusion, decor=m.decor,
                                encoder_options=EncoderMemoryOptions.from_model_config(m))
    model = PrefMemoryTM(catalog, cb, build_backbone(m.backbone), m.token_dim, m.pref_memory, window=m.window,
                         fusion=m.token_fusion)
    model.trie = trie
    return model
