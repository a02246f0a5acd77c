"""Engram tables as one TorchRec EmbeddingBagCollection, and batched key lookups through it.

* One EBC feature per table (feature name == table name), pooling SUM, at most one id per bag. A
  masked / padded / invalid key is an EMPTY bag (length 0): it returns the zero vector and never
  touches (nor trains) a real row.
* Initialisation: uniform(-init_scale, +init_scale) through ``weight_init_min/max`` of the table
  config, which both the unsharded module and the sharded fused (fbgemm) kernel honour.
* One forward pass gathers every request of every table into ONE KeyedJaggedTensor and calls the
  (possibly DMP-sharded) collection once. A KJT has one batch size (stride) for all features, so
  each feature's bags are padded with empty bags up to the largest request count of the pass (the
  safe choice under DMP; variable-stride KJTs are not used). The output KeyedTensor is indexed BY
  KEY: sharded collections return features in a different order.

This module imports torchrec's non-distributed parts only; sharding lives in comeir_dist.parallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torchrec import DataType, EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.hashing import TableHasher, build_hashers
from comeir_dist.engram.sizing import TableSpec, table_specs
from comeir_dist.engram.cross_fit import fold_rows

_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def build_engram_collection(specs: Sequence[TableSpec], device: str | torch.device = "meta",
                            dtype: str = "fp32", init_scale: float = 0.01) -> EmbeddingBagCollection:
    """EBC with one SUM-pooled feature per table. ``device="meta"`` allocates nothing (for DMP)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate Engram table names")
    cfgs = [EmbeddingBagConfig(name=s.name, embedding_dim=s.dim, num_embeddings=s.rows, feature_names=[s.name],
                               pooling=PoolingType.SUM, data_type=_DTYPES[dtype],
                               weight_init_min=-float(init_scale), weight_init_max=float(init_scale))
            for s in specs]
    return EmbeddingBagCollection(tables=cfgs, device=torch.device(device))


def collection_features(ebc: torch.nn.Module) -> dict[str, int]:
    """feature name -> embedding dim, in the collection's feature order (unsharded EBC)."""
    return {f: c.embedding_dim for c in ebc.embedding_bag_configs() for f in c.feature_names}


def make_kjt(ids: Mapping[str, torch.Tensor], valid: Mapping[str, torch.Tensor] | None = None,
             features: Sequence[str] | None = None, stride: int | None = None) -> KeyedJaggedTensor:
    """KJT with one bag per requested id: ``ids[name] [N_name]``, ``valid[name] [N_name]`` (bool).

    ``features``: all feature names the collection expects, in any order (missing ones get empty
    bags; default = the keys of ``ids``). Every feature is padded with empty bags to ``stride``
    (default: the largest N_name, at least 1). Invalid ids become empty bags.
    """
    feats = list(features) if features is not None else list(ids)
    unknown = set(ids) - set(feats)
    if unknown:
        raise KeyError(f"ids for unknown features: {sorted(unknown)[:5]}")
    counts = {n: int(t.numel()) for n, t in ids.items()}
    s = max([1, *counts.values()]) if stride is None else int(stride)
    if any(c > s for c in counts.values()):
        raise ValueError(f"stride {s} smaller than a request ({max(counts.values())})")
    dev = next((t.device for t in ids.values()), torch.device("cpu"))
    values, lengths = [], []
    for f in feats:
        if f in ids:
            x = ids[f].reshape(-1).long()
            ok = (valid[f].reshape(-1).bool() if valid is not None and f in valid
                  else torch.ones_like(x, dtype=torch.bool))
            values.append(x[ok])
            ln = ok.long()
            if ln.numel() < s:
                ln = torch.cat([ln, ln.new_zeros(s - ln.numel())])
            lengths.append(ln)
        else:
            lengths.append(torch.zeros(s, dtype=torch.long, device=dev))
    v = torch.cat(values) if values else torch.zeros(0, dtype=torch.long, device=dev)
    return KeyedJaggedTensor(keys=feats, values=v, lengths=torch.cat(lengths), stride=s)


def pad_kjt_stride(kjt: KeyedJaggedTensor, stride: int) -> KeyedJaggedTensor:
    """Same bags, padded with empty bags so every feature has ``stride`` bags (>= the current stride).

    Under DMP every rank must call the collection with the SAME stride (the pooled output exchange
    assumes equal per-rank batch sizes); ``parallel.sparse.EngramShardedLookup`` agrees on the
    maximum and pads with this function."""
    s = kjt.stride()
    if stride == s:
        return kjt
    if stride < s:
        raise ValueError(f"cannot shrink stride {s} to {stride}")
    f = len(kjt.keys())
    lengths = kjt.lengths().reshape(f, s)
    lengths = torch.cat([lengths, lengths.new_zeros(f, stride - s)], dim=1).reshape(-1)
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=lengths, stride=stride)


def unpack(kt: KeyedTensor, counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Rows ``[N_name, dim]`` per requested feature from the collection output (indexed by key)."""
    d = kt.to_dict()
    return {n: d[n][:c] for n, c in counts.items()}


@dataclass
class _Request:
    names: list[str]  # one feature per head (K entries for add_key, 1 for add_ids)
    starts: list[int]  # row offset of this request inside each feature's bags
    shape: tuple[int, ...]


class EngramIndex:
    """Static addressing of the Engram memory: table specs, per-table hashers, feature order.

    Built once per model from an :class:`EngramConfig`; it owns no parameters. ``new_batch()``
    starts a per-forward :class:`EngramKeyBatch`.
    """

    def __init__(self, specs: Sequence[TableSpec], hash_seed: int):
        self.specs = list(specs)
        self.by_name = {s.name: s for s in self.specs}
        self.hashers: dict[str, TableHasher] = build_hashers(self.specs, hash_seed)
        self.features = [s.name for s in self.specs]
        # table name -> bool [rows]: rows a key may address (model/key_support.py, engram.min_key_users); None = all
        self.row_filter: dict[str, torch.Tensor] | None = None
        # engram.cross_fit_unwritten: empty -- {table: bool [2, rows]}, slot s of fold k is live iff a fold-k
        # training sequence produces a key hashing to s (model/key_support.py install_fold_filter)
        self.fold_filter: dict[str, torch.Tensor] | None = None
        self._heads: dict[tuple[str, int, int], list[TableSpec]] = {}
        for s in self.specs:
            self._heads.setdefault((s.memory, s.level, s.order), []).append(s)
        for v in self._heads.values():
            v.sort(key=lambda s: s.head)

    @classmethod
    def from_config(cls, cfg: EngramConfig) -> "EngramIndex":
        return cls(table_specs(cfg), cfg.hash_seed)

    def heads(self, memory: str, level: int, order: int) -> list[TableSpec]:
        try:
            return self._heads[(memory, level, order)]
        except KeyError:
            raise KeyError(f"no Engram tables for memory={memory} level={level} order={order}") from None

    def orders(self, memory: str, level: int) -> list[int]:
        """The n-gram orders present for (memory, level), ascending."""
        return sorted(o for (m, l, o) in self._heads if m == memory and l == level)

    def address_dim(self, memory: str, level: int, order: int) -> int:
        return sum(s.dim for s in self.heads(memory, level, order))

    def new_batch(self) -> "EngramKeyBatch":
        return EngramKeyBatch(self)


class EngramKeyBatch:
    """Accumulates the lookups of one forward pass, builds one KJT, and slices the result.

    >>> batch = index.new_batch()
    >>> h = batch.add_key("inter", 2, 1, keys, valid)        # keys [..., o] -> address [..., d_m]
    >>> out = sparse_module(batch.kjt())                       # EBC or DMP(EBC), called once
    >>> addr = batch.unpack(out)[h]                            # [..., d_m]; zeros where invalid
    """

    def __init__(self, index: EngramIndex):
        self.index = index
        self._ids: dict[str, list[torch.Tensor]] = {}
        self._valid: dict[str, list[torch.Tensor]] = {}
        self._count: dict[str, int] = {}
        self._requests: list[_Request] = []
        self._built: KeyedJaggedTensor | None = None

    def _push(self, name: str, ids: torch.Tensor, valid: torch.Tensor) -> int:
        start = self._count.get(name, 0)
        self._ids.setdefault(name, []).append(ids.reshape(-1).long())
        self._valid.setdefault(name, []).append(valid.reshape(-1).bool())
        self._count[name] = start + ids.numel()
        return start

    def add_ids(self, name: str, ids: torch.Tensor, valid: torch.Tensor | None = None) -> int:
        """Raw row ids of one table (any shape); returns a handle whose result is ``[*ids.shape, dim]``."""
        if name not in self.index.by_name:
            raise KeyError(f"unknown Engram table {name!r}")
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        self._built = None
        start = self._push(name, ids, valid.expand_as(ids))
        self._requests.append(_Request([name], [start], tuple(ids.shape)))
        return len(self._requests) - 1

    def add_key(self, memory: str, level: int, order: int, keys: torch.Tensor, valid: torch.Tensor,
                fold: torch.Tensor | None = None) -> int:
        """Hash ``keys [..., o]`` into every head of (memory, level, order) (Eq. 14, 39); the handle's
        result is the concatenated address ``[..., d_m]`` (exactly zero where ``valid`` is False).
        ``fold`` (0/1, broadcastable to ``keys.shape[:-1]``): address each key's row of that fold
        (``engram.cross_fit``, engram/cross_fit.py); None = the hash slot itself."""
        heads = self.index.heads(memory, level, order)
        if keys.shape[-1] != order:
            raise ValueError(f"keys of order {order} need trailing dim {order}, got {tuple(keys.shape)}")
        shape = tuple(keys.shape[:-1])
        valid = valid.bool().expand(shape)
        self._built = None
        names, starts = [], []
        rf, ff = self.index.row_filter, self.index.fold_filter
        for s in heads:
            ids = self.index.hashers[s.name](keys)
            live = valid if rf is None else valid & _on(rf, s.name, ids.device)[ids]  # filtered: an empty bag
            if fold is not None:  # after the filter: it judges the key, the fold only picks one of its rows
                f = fold.expand(shape).long()
                if ff is not None:  # that fold's row is never trained: an empty bag (cross_fit_unwritten: empty)
                    live = live & _on(ff, s.name, ids.device)[f, ids]
                ids = fold_rows(ids, f, s.rows)
            starts.append(self._push(s.name, ids, live))
            names.append(s.name)
        self._requests.append(_Request(names, starts, shape))
        return len(self._requests) - 1

    def addressed_rows(self):
        """``(table name, row ids, valid, request shape)`` of every head of every request, in ``add_*`` order
        (ids are ``[prod(shape)]``, flattened from the request's shape)."""
        ids = {n: torch.cat(v) for n, v in self._ids.items()}
        valid = {n: torch.cat(v) for n, v in self._valid.items()}
        for r in self._requests:
            n = 1
            for x in r.shape:
                n *= x
            for name, st in zip(r.names, r.starts):
                yield name, ids[name][st:st + n], valid[name][st:st + n], r.shape

    @property
    def stride(self) -> int:
        return max([1, *self._count.values()])

    def kjt(self, min_stride: int = 0) -> KeyedJaggedTensor:
        """One KJT over ALL features of the collection (unrequested ones are empty), with
        max(``stride``, ``min_stride``) bags per feature."""
        if self._built is None:
            ids = {n: torch.cat(v) for n, v in self._ids.items()}
            valid = {n: torch.cat(v) for n, v in self._valid.items()}
            self._built = make_kjt(ids, valid, features=self.index.features, stride=self.stride)
        return pad_kjt_stride(self._built, max(self.stride, int(min_stride)))

    def unpack(self, out: KeyedTensor) -> list[torch.Tensor]:
        """Result tensor per handle (in ``add_*`` order) from the collection's output."""
        d = out.to_dict()
        res = []
        for r in self._requests:
            n = 1
            for x in r.shape:
                n *= x
            parts = [d[name][st:st + n] for name, st in zip(r.names, r.starts)]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            res.append(t.reshape(*r.shape, t.shape[-1]))
        return res

    def lookup(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """``unpack(module(kjt()))``: one call of the collection -- an unsharded EBC, or under DMP the
        ``parallel.sparse.EngramShardedLookup`` wrapper (which equalises the stride across ranks)."""
        return self.unpack(module(self.kjt()))


def _on(row_filter: dict[str, torch.Tensor], name: str, device: torch.device) -> torch.Tensor:
    """``row_filter[name]`` on ``device`` (moved once, then kept there)."""
    f = row_filter[name]
    if f.device != device:
        f = row_filter[name] = f.to(device)
    return f


def table_names(specs: Iterable[TableSpec]) -> list[str]:
    return [s.name for s in specs]
