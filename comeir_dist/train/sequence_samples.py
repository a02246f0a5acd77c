"""All-position training samples (``train.sample_mode: sequence``, sasrec with or without ``model.pref_memory``).

A user's training sequence ``s`` gives inputs ``x = s[:-1]`` and targets ``y = s[1:]`` (position i of x predicts
``y[i]``). It is cut into windows from its END, each window the :func:`archive_samples.align_archive` suffix of
what is left (``width`` = max_history, or pref_memory.archive_items with segments of ``seg`` items aligned from the
user's first item; plain sasrec uses ``seg = 1``): the most recent window ends at the last item, every earlier
window ends where the next one starts, so windows partition the sequence and every item is a target exactly once
per epoch -- as in prefix mode, at one sample per window instead of one per item. Rows are left-padded with -1
(inputs and targets alike), most recent last, so a window is read exactly like a prefix sample's history: a
causal model's output at input position i is the prefix sample ``(x[:i+1], y[i])`` -- within the window.
"""
from __future__ import annotations

import numpy as np

from comeir_dist.train.archive_samples import align_archive
from comeir_dist.train.samples import no_training_samples, train_sequences


def sequence_windows(seqs: list[list[int]], width: int, seg: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(inputs ``[S, width]``, targets ``[S, width]``), both left-padded with -1; see the module docstring."""
    xs, ys = [], []
    for s in seqs:
        x, y = list(s[:-1]), list(s[1:])
        end = len(x)
        while end > 0:
            keep = len(align_archive(x[:end], width, seg))
            xs.append(x[end - keep:end])
            ys.append(y[end - keep:end])
            end -= keep
    inputs = np.full((len(xs), width), -1, dtype=np.int64)
    targets = np.full((len(xs), width), -1, dtype=np.int64)
    for i, (x, y) in enumerate(zip(xs, ys)):
        inputs[i, width - len(x):] = x
        targets[i, width - len(y):] = y
    return inputs, targets


def sequence_training_samples(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The run's all-position windows: archive_items / segment_items with pref_memory, else max_history / 1."""
    pm = cfg.model.pref_memory
    width, seg = (pm.archive_items, pm.segment_items) if pm.enabled else (cfg.max_history, 1)
    inputs, targets = sequence_windows(train_sequences(cfg.dataset), width, seg)
    if len(inputs) == 0:
        raise no_training_samples(cfg.dataset)
    return inputs, targets
