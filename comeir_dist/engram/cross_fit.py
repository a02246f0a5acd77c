"""``engram.cross_fit`` (an extension, not in the paper): two-fold cross-fitted Engram memories.

Why: a memory row keyed by a training transition is trained by the very samples that later read it. After one
epoch the row of (history suffix, target) holds that sample's label, and rows of a user's n-grams are written by
the user's other prefix samples (its "future") before the sample that reads them -- while at test time the target
transition was never trained and the user's rows hold only the past. The model learns to read its own labels back
(the one-epoch cliff under *What holds ComeIR back* in the README).

How: every history falls in one of two folds f (:func:`history_fold`). Each key has two rows in the same table
(:func:`fold_rows`: a fixed permutation of the hash slot per fold). A sample of fold f READS the row of fold 1-f
and WRITES (receives the gradient at) the row of fold f: ``value = write + (read - write).detach()``
(:func:`straight_through`). So a row of fold f is trained by fold-f users only and read by fold-(1-f) users only:
no sample ever reads a row its own user trained, in training as at test time. Without gradients (evaluation)
only the read row is looked up. The price: each row learns from half of the users.

The fold is a hash of the OLDEST item of the model's input window. A user whose whole history fits
``max_history`` keeps one fold for all its prefix samples, all-position windows, validation and test (99.3% of
the bundled data's users); a longer user's samples may change fold as the window slides (partial exclusion).
"""
from __future__ import annotations

import torch

_GOLDEN = 2654435761  # Knuth's multiplicative hash constant (odd, ~2^32 / phi)


def history_fold(items: torch.Tensor) -> torch.Tensor:
    """Fold (0/1, long) of every row of left-padded ``items [B, N]`` (-1 = padding): a hash of its oldest item.
    An empty row is fold 0 (it addresses no row)."""
    first = (items < 0).sum(dim=1).clamp(max=items.shape[1] - 1)
    oldest = items.gather(1, first.unsqueeze(1)).squeeze(1).clamp(min=0)
    return ((oldest * _GOLDEN) & 0xFFFFFFFF).bitwise_right_shift(16) & 1


def sequence_folds(sequences: list, max_history: int) -> list[int]:
    """Fold of each user's sequence as its last training window sees it: :func:`history_fold` of its last
    ``max_history`` items (the oldest item there; at test time the same for users whose history fits the window).
    For analysis (``comeir analyze keys``)."""
    oldest = [int(list(q)[-max_history:][0]) if len(q) else -1 for q in sequences]
    return history_fold(torch.tensor(oldest, dtype=torch.long).unsqueeze(1)).tolist() if oldest else []


def fold_rows(ids: torch.Tensor, fold: torch.Tensor, rows: int) -> torch.Tensor:
    """The fold-``fold`` row of hash slots ``ids`` in a table of ``rows`` rows: fold 0 is the slot itself, fold 1
    the slot shifted by half the table (a permutation: the two rows of a key differ whenever ``rows`` > 1)."""
    return torch.remainder(ids + fold.long() * (rows // 2), rows)


def straight_through(read: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """Forward value ``read``; its gradient goes to ``write`` (none to ``read``)."""
    return write + (read - write).detach()
