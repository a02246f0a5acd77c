"""Long-history samples for ``model.pref_memory`` (Rec2PM): the archive of each sample instead of the last
``max_history`` items.

Each user's training sequence is stored ONCE (one flat int64 array + offsets, built when training starts); a
sample is (user, end) and its archive ``[archive_items]`` row is cut from the user's sequence when its batch is
drawn (:class:`ArchiveHistory` indexes like the ``[S, N]`` array of ``samples.training_samples``, so the loop
is unchanged). Segments are aligned from the user's first item (model/pref_memory.py): :func:`align_archive`
keeps the recent segment (r = ((n - 1) mod seg) + 1 items) plus as many whole earlier segments as fit.
"""
from __future__ import annotations

import numpy as np

from comeir_dist.data.dataset import read_split
from comeir_dist.train.samples import no_training_samples, pad_left, split_samples


def align_archive(seq, archive_items: int, seg: int):
    """The last r + seg * floor((archive_items - r) / seg) items of ``seq`` (r = ((n - 1) mod seg) + 1)."""
    n = len(seq)
    if n == 0:
        return seq[:0]
    r = (n - 1) % seg + 1
    keep = r + seg * max(0, (archive_items - r) // seg)
    return seq[max(0, n - keep):]


class ArchiveHistory:
    """``[S, archive_items]`` history rows built on indexing from per-user sequences stored once."""

    def __init__(self, seqs: list[list[int]], archive_items: int, seg: int):
        lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
        self.flat = np.asarray([i for s in seqs for i in s], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        per_user = np.maximum(lengths - 1, 0)
        self.user = np.repeat(np.arange(len(seqs)), per_user)
        self.end = np.concatenate([np.arange(1, n) for n in lengths]) if len(seqs) else np.zeros(0, np.int64)
        self.end = self.end.astype(np.int64)
        self.width, self.seg = archive_items, seg
        self.target = self.flat[self.offsets[self.user] + self.end] if len(self.user) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.user)

    def lengths(self) -> np.ndarray:
        """Items of every sample's archive row (:func:`align_archive` of its prefix), without building the rows."""
        n = self.end
        r = (n - 1) % self.seg + 1
        return np.minimum(n, r + self.seg * np.maximum(0, (self.width - r) // self.seg))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.width

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx))
        rows = []
        for s in idx:
            start = self.offsets[self.user[s]]
            rows.append(align_archive(self.flat[start:start + self.end[s]], self.width, self.seg))
        out = np.full((len(rows), self.width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, self.width - len(r):] = r
        return out


def archive_training_samples(dataset_dir, archive_items: int, seg: int) -> tuple[ArchiveHistory, np.ndarray]:
    """Every prefix of every user's training items as (ArchiveHistory, target [S]) (same order as
    ``samples.training_samples``)."""
    hist = ArchiveHistory(read_split(dataset_dir, "train").column("items").to_pylist(), archive_items, seg)
    if len(hist) == 0:
        raise no_training_samples(dataset_dir)
    return hist, hist.target


def archive_split_samples(dataset_dir, split: str, archive_items: int, seg: int):
    """(user_idx [U], archive [U, archive_items], target [U]) of the valid or test split."""
    t = read_split(dataset_dir, split)
    users = np.asarray(t.column("user_idx").to_pylist(), dtype=np.int64)
    rows = [align_archive(h, archive_items, seg) for h in t.column("history").to_pylist()]
    return users, pad_left(rows, archive_items), np.asarray(t.column("target").to_pylist())


def run_training_samples(cfg):
    """The training samples of a run: all-position windows with ``train.sample_mode: sequence``
    (train/sequence_samples.py), archives with ``model.pref_memory.enabled``, else the last max_history."""
    from comeir_dist.train.samples import training_samples

    if cfg.train.sample_mode == "sequence":
        from comeir_dist.train.sequence_samples import sequence_training_samples

        return sequence_training_samples(cfg)
    pm = cfg.model.pref_memory
    if pm.enabled:
        return archive_training_samples(cfg.dataset, pm.archive_items, pm.segment_items)
    return training_samples(cfg.dataset, cfg.max_history)


def run_split_samples(cfg, split: str):
    pm = cfg.model.pref_memory
    if pm.enabled:
        return archive_split_samples(cfg.dataset, split, pm.archive_items, pm.segment_items)
    return split_samples(cfg.dataset, split, cfg.max_history)
