"""Training and evaluation samples as padded tensors (left padding with -1, most recent item last)."""
from __future__ import annotations

import numpy as np
import torch

from comeir_dist.data.dataset import read_split
from comeir_dist.errors import UserError


def pad_left(seqs: list[list[int]], width: int) -> np.ndarray:
    """Most recent ``width`` items of each sequence, left-padded with -1."""
    out = np.full((len(seqs), width), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        tail = s[-width:]
        if tail:
            out[i, width - len(tail):] = tail
    return out


def train_sequences(dataset_dir) -> list[list[int]]:
    """Every user's training items (``train.parquet``), oldest first."""
    return read_split(dataset_dir, "train").column("items").to_pylist()


def training_samples(dataset_dir, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Every prefix of every user's training items: (history [S, N], target [S])."""
    hist, tgt = [], []
    for seq in train_sequences(dataset_dir):
        for j in range(1, len(seq)):
            hist.append(seq[max(0, j - max_history):j])
            tgt.append(seq[j])
    if not tgt:
        raise no_training_samples(dataset_dir)
    return pad_left(hist, max_history), np.asarray(tgt, dtype=np.int64)


def count_training_samples(dataset_dir) -> int:
    """Samples :func:`training_samples` yields: sum over users of (train items - 1), without building them."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(read_split(dataset_dir, "train").column("items")).to_numpy(zero_copy_only=False)
    return int(np.maximum(lengths - 1, 0).sum())


def no_training_samples(dataset_dir) -> UserError:
    return UserError(f"{dataset_dir}/train.parquet: 0 training samples (no user's train sequence has 2 or more items, "
                     f"i.e. no user has more than 3 interactions); training needs a user with >= 4 items: re-run "
                     f"`comeir prepare` on more data")


def require_training_samples(dataset_dir) -> int:
    """The training sample count; a one-line UserError when it is 0 (training would divide by zero)."""
    n = count_training_samples(dataset_dir)
    if n == 0:
        raise no_training_samples(dataset_dir)
    return n


def split_samples(dataset_dir, split: str, max_history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_idx [U], history [U, N], target [U]) of the valid or test split."""
    t = read_split(dataset_dir, split)
    users = np.asarray(t.column("user_idx").to_pylist(), dtype=np.int64)
    return users, pad_left(t.column("history").to_pylist(), max_history), np.asarray(t.column("target").to_pylist())


class EpochSampler:
    """Seeded shuffled batches with an explicit position (epoch, offset) so a run can resume exactly."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0,
                 lengths: np.ndarray | None = None, buckets: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self.lengths, self.buckets = lengths, buckets
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.n)
        if not self.buckets or self.lengths is None:
            return perm
        return bucket_by_length(perm, self.lengths, self.batch_size, self.buckets, rng)

    def next(self) -> np.ndarray:
        if self.offset >= self.n:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.offset:self.offset + self.batch_size]
        self.offset += len(idx)
        return idx

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


def bucket_by_length(perm: np.ndarray, lengths: np.ndarray, batch_size: int, buckets: int,
                     rng: np.random.Generator) -> np.ndarray:
    """``train.length_buckets``: sort every run of ``buckets`` batches of the shuffled order by sample length,
    cut it into batches, shuffle the full batches (the remainder stays last, so every batch is one slice of the
    order): a batch holds samples of similar length and pads to its longest one, not to the longest overall.
    Still a permutation of the samples (every sample once per epoch), deterministic in (seed, epoch)."""
    chunk = batch_size * buckets
    parts = [perm[i:i + chunk] for i in range(0, len(perm), chunk)]
    order = np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in parts]) if parts else perm
    full = len(order) // batch_size
    blocks = order[:full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([blocks.reshape(-1), order[full * batch_size:]])


def row_lengths(hist) -> np.ndarray:
    """Real items per history row: ``hist.lengths()`` (archives) or the non-padding count of an ``[S, N]`` array."""
    own = getattr(hist, "lengths", None)
    return own() if callable(own) else (np.asarray(hist) >= 0).sum(1)


def to_batch(hist: np.ndarray, target: np.ndarray | None, device):
    from comeir_dist.model.history import HistoryBatch

    return HistoryBatch(torch.as_tensor(hist, device=device),
                        None if target is None else torch.as_tensor(target, device=device))
