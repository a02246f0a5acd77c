"""Engram memory plumbing for the model: sparse tables grouped per (memory, level), and their lookups.

Tables are grouped into one EmbeddingBagCollection per (memory, level) because every lookup of a
forward pass for one group shares a stride (KJT batch size): decoding level l then touches only the
groups of level l instead of padding all 30+ tables to the candidate count.

``EngramTables`` is the whole sparse part. It is a plain module here; ``comeir_dist.parallel`` wraps
it in DistributedModelParallel (fused row-wise Adagrad) without this file knowing about it.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.cross_fit import straight_through
from comeir_dist.engram.patterns import short_key_marker
from comeir_dist.engram.sizing import TableSpec, table_specs
from comeir_dist.engram.tables import EngramIndex, EngramKeyBatch, build_engram_collection


def group_name(memory: str, level: int) -> str:
    return f"{memory}_l{level}"


def grouped_specs(cfg: EngramConfig) -> dict[str, list[TableSpec]]:
    groups: dict[str, list[TableSpec]] = defaultdict(list)
    for s in table_specs(cfg):
        groups[group_name(s.memory, s.level)].append(s)
    return dict(groups)


class EngramTables(nn.Module):
    """All Engram tables: ``forward({group: KJT}) -> {group: KeyedTensor}``.

    Unsharded, the collections are ordinary submodules (``groups``). Once sharded, the distributed
    modules are attached with :meth:`attach` and kept OUTSIDE this module tree: the dense optimizer,
    ``model.state_dict()`` and DeepSpeed never see them (their state is saved through the sharded path),
    and a DMP nested in a module tree would rewrite its parent's state-dict keys.
    """

    def __init__(self, cfg: EngramConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.groups = nn.ModuleDict({
            g: build_engram_collection(specs, device=device, dtype=cfg.table_dtype, init_scale=cfg.init_scale)
            for g, specs in grouped_specs(cfg).items()})
        self._attached: dict[str, nn.Module] | None = None
        self._call_groups = None

    def attach(self, modules: dict[str, nn.Module], call_groups=None) -> None:
        """Serve lookups from ``modules`` (e.g. DMP-sharded collections) and drop the unsharded ones.
        ``call_groups({group: KJT}) -> {group: KeyedTensor}``, if given, serves a whole forward at once (the
        parallel layer schedules every group's exchanges together); else each group module is called in turn."""
        if set(modules) != set(self.groups.keys()):
            raise ValueError(f"attach needs every group {sorted(self.groups.keys())}, got {sorted(modules)}")
        object.__setattr__(self, "_attached", dict(modules))
        object.__setattr__(self, "_call_groups", call_groups)
        self.groups = nn.ModuleDict()

    def collections(self) -> dict[str, nn.Module]:
        return self._attached if self._attached is not None else dict(self.groups.items())

    def forward(self, kjts: dict):
        if self._call_groups is not None:
            return self._call_groups(kjts)
        mods = self.collections()
        return {g: mods[g](kjt) for g, kjt in kjts.items()}


class EngramLookup:
    """Static addressing (hashers per group) and a per-forward request collector."""

    def __init__(self, cfg: EngramConfig):
        self.cfg = cfg
        self.short_keys = cfg.short_keys  # Eq. 13/19 rule for inter keys longer than the history (patterns.py)
        self.cross_fit = cfg.cross_fit  # read the other fold's row, write the own fold's (engram/cross_fit.py)
        self.cross_fit_memories = frozenset(cfg.cross_fit_memories)  # the memories whose keys are cross-fitted
        self.index = {g: EngramIndex(specs, cfg.hash_seed) for g, specs in grouped_specs(cfg).items()}

    def orders(self, memory: str, level: int) -> list[int]:
        g = group_name(memory, level)
        return self.index[g].orders(memory, level) if g in self.index else []

    def new_pass(self, fold: torch.Tensor | None = None) -> "LookupPass":
        """``fold [B]``: the cross-fit fold of each history row of the pass (None without ``engram.cross_fit``)."""
        return LookupPass(self, fold if self.cross_fit else None)


def inter_short_marker(lookup, level: int, codebook_size: int, d_max: int) -> int | None:
    """The ``short_marker`` argument of ``patterns.inter_keys`` / ``inter_candidate_keys`` for ``lookup``'s
    ``short_keys`` rule: None for 'drop', the level-l marker D_l for 'shorten'. The encoder and the head both
    call this, so teacher-forced and decode-time keys follow one rule. ``codebook_size``/``d_max`` are those
    the units were encoded with."""
    rule = getattr(lookup, "short_keys", "drop")
    if rule == "drop":
        return None
    if rule != "shorten":
        raise ValueError(f"engram.short_keys: {rule!r}; allowed values: shorten, drop")
    return short_key_marker(level, codebook_size, d_max)


class LookupPass:
    """Collects ``add(memory, level, order, keys, valid)`` requests, then one ``run(tables)`` call.

    Results are read per handle (``lp[h]``, ``[*keys.shape[:-1], d_m]``) or, for the orders of one read,
    stacked (``lp.stacked([h_1, .., h_O])``, ``[..., O, d_m]``). Both are views of the group's pooled
    output when the requested heads are adjacent columns of it covering the same bags (the usual layout:
    one feature per (order, head) in ascending order, every order requested once per pass), else copies.
    Decoding reads O orders x K heads x d_m/K columns per candidate; the views spare concatenating and
    stacking them ([M, O, d_m] copies, several per level) after the table call.
    """

    def __init__(self, lookup: EngramLookup, fold: torch.Tensor | None = None):
        self.lookup = lookup
        self.fold = fold  # [B] cross-fit fold per history row of the pass; None = no cross-fitting
        self.batches: dict[str, EngramKeyBatch] = {}
        # handle -> (group, request index of the read, of the write): one request unless cross-fitted with grads
        self.handles: list[tuple[str, int, int]] = []
        self._out: dict[str, tuple] | None = None  # group -> (KeyedTensor, pooled values, {feature: column})
        self._unpacked: dict[str, list[torch.Tensor]] = {}  # group -> per-request copies (fallback)

    def add(self, memory: str, level: int, order: int, keys: torch.Tensor, valid: torch.Tensor,
            fold: torch.Tensor | None = None) -> int:
        """``fold``: the cross-fit fold of each key (broadcastable to ``keys.shape[:-1]``), e.g. ``self.fold`` gathered
        per key; ignored when the pass is not cross-fitted or ``memory`` is not in ``engram.cross_fit_memories``.
        A cross-fitted key reads its row of the other fold and, when gradients are on, trains its row of its own
        fold (engram/cross_fit.py)."""
        g = group_name(memory, level)
        if g not in self.batches:
            self.batches[g] = self.lookup.index[g].new_batch()
        batch = self.batches[g]
        if self.fold is None or fold is None or memory not in self.lookup.cross_fit_memories:
            r = batch.add_key(memory, level, order, keys, valid)
            self.handles.append((g, r, r))
        else:
            r = batch.add_key(memory, level, order, keys, valid, fold=1 - fold)
            w = batch.add_key(memory, level, order, keys, valid, fold=fold) if torch.is_grad_enabled() else r
            self.handles.append((g, r, w))
        return len(self.handles) - 1

    def run(self, tables: nn.Module) -> None:
        self._out, self._unpacked = {}, {}
        if not self.batches:
            return
        out = tables({g: b.kjt() for g, b in self.batches.items()})
        for g in self.batches:
            kt = out[g]  # reading the KeyedTensor resolves DMP's lazy output exchange here, inside run()
            values = kt.values()
            cols = dict(zip(kt.keys(), kt.offset_per_key())) if kt.key_dim() == 1 and values.dim() == 2 else None
            self._out[g] = (kt, values, cols)

    def __getitem__(self, handle: int) -> torch.Tensor:
        return self._combined([handle], stack=False)

    def stacked(self, handles: list[int]) -> torch.Tensor:
        """Addresses of ``handles`` (same group and key shape, equal widths) stacked: ``[..., O, d_m]``."""
        return self._combined(handles, stack=True)

    def _combined(self, handles: list[int], stack: bool) -> torch.Tensor:
        entries = [self.handles[h] for h in handles]
        read = self._requests_result([(g, r) for g, r, _ in entries], stack)
        if all(r == w for _, r, w in entries):
            return read
        return straight_through(read, self._requests_result([(g, w) for g, _, w in entries], stack))

    def _requests_result(self, reqs: list[tuple[str, int]], stack: bool) -> torch.Tensor:
        view = self._view(reqs, stack=stack)
        if view is not None:
            return view
        parts = [self._unpack(g)[r] for g, r in reqs]
        return torch.stack(parts, dim=-2) if stack else parts[0]

    def _unpack(self, g: str) -> list[torch.Tensor]:
        if g not in self._unpacked:
            self._unpacked[g] = self.batches[g].unpack(self._out[g][0])
        return self._unpacked[g]

    def _view(self, reqs: list[tuple[str, int]], stack: bool = False) -> torch.Tensor | None:
        """The requests' heads (``(group, request index)``) as one slice of the group's pooled output
        ``[bags, sum of dims]``, or None when they are not adjacent columns of the same bag rows."""
        if self._out is None:
            raise RuntimeError("LookupPass.run() has not been called")
        groups = {g for g, _ in reqs}
        if len(groups) != 1:
            return None
        g = groups.pop()
        kt, values, cols = self._out[g]
        if cols is None:
            return None
        # request bookkeeping (feature names and bag offsets per head) lives in the group's EngramKeyBatch
        reqs = [self.batches[g]._requests[r] for _, r in reqs]
        shape, start = reqs[0].shape, reqs[0].starts[0]
        if any(r.shape != shape or any(s != start for s in r.starts) for r in reqs):
            return None
        names = [n for r in reqs for n in r.names]
        if any(n not in cols for n in names):
            return None
        dims = self.lookup.index[g].by_name
        c0 = col = cols[names[0]]
        for n in names:
            if cols[n] != col:
                return None
            col += dims[n].dim
        width = (col - c0) // len(reqs)
        if stack and any(sum(dims[n].dim for n in r.names) != width for r in reqs):
            return None
        out = values[start:start + math.prod(shape), c0:col]
        return out.reshape(*shape, len(reqs), width) if stack else out.reshape(*shape, col - c0)
