"""Quality numbers of a semantic-ID assignment (written to sids/<method>/report.json).

* ``utilisation``: per level, distinct codes used / C.
* ``distinct_sids``: number of distinct L-tuples; ``distinct_fraction`` = distinct_sids / items.
* ``items_in_collisions``: items whose SID is shared with at least one other item
  (a SID held by 3 items contributes 3); ``max_items_per_sid``: size of the largest such group;
  ``collision_groups``: number of SIDs held by more than one item; ``collision_group_sizes``:
  {group size: number of SIDs of that size} for sizes >= 2 (keys are strings, JSON).
* ``recon_mse``: mean over items and embedding dimensions of (m - m_hat)^2, where m_hat is the sum of
  the chosen centroids (RQ-KMeans) or the decoder output Dec(z_hat) (RQ-VAE);
  ``recon_rel_err`` = sum ||m - m_hat||^2 / sum ||m||^2 (scale-free companion).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np


def sid_stats(codes: np.ndarray, codebook_size: int) -> dict:
    """Utilisation and collision statistics of codes [I, L]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [items, levels], got shape {codes.shape}")
    n, levels = codes.shape
    util = [round(len(np.unique(codes[:, l])) / codebook_size, 6) for l in range(levels)]
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = counts[inverse.reshape(-1)]
    return {
        "items": int(n),
        "utilisation": util,
        "used_codes": [int(len(np.unique(codes[:, l]))) for l in range(levels)],
        "distinct_sids": int(len(counts)),
        "distinct_fraction": round(len(counts) / max(n, 1), 6),
        "items_in_collisions": int((group > 1).sum()),
        "max_items_per_sid": int(counts.max()) if n else 0,
        "collision_groups": int((counts > 1).sum()),
        "collision_group_sizes": {str(int(k)): int(v) for k, v in zip(*np.unique(counts[counts > 1],
                                                                                  return_counts=True))},
    }


def recon_errors(x: np.ndarray, x_hat: np.ndarray) -> dict:
    """Reconstruction error of x_hat against x (both [I, d])."""
    x = np.asarray(x, dtype=np.float64)
    diff = x - np.asarray(x_hat, dtype=np.float64)
    sq = float((diff * diff).sum())
    return {"recon_mse": float(sq / max(diff.size, 1)),
            "recon_rel_err": float(sq / max(float((x * x).sum()), 1e-30))}


def codes_fingerprint(codes: np.ndarray, tag: Optional[str] = None) -> str:
    """sha256 of the codes as a C-contiguous int32 [I, L] array (the SID fingerprint).

    ``tag`` (``QuantizeConfig.sid_tag``, e.g. ``"assign=argmin"``) is appended to the hashed bytes, so SIDs
    assigned by another rule never share a fingerprint; None keeps the fingerprint of every SID table
    written before the tag existed (balanced assignment)."""
    h = hashlib.sha256(np.ascontiguousarray(codes, dtype=np.int32).tobytes())
    if tag is not None:
        h.update(b"\0" + str(tag).encode())
    return h.hexdigest()


def summarize(codes: np.ndarray, codebook_size: int, x: np.ndarray, x_hat: np.ndarray,
              wall_time_s: Optional[float] = None, seed: Optional[int] = None) -> dict:
    """All report numbers of one fitted quantiser."""
    out = {}
    if seed is not None:
        out["seed"] = int(seed)
    out.update(sid_stats(codes, codebook_size))
    out.update(recon_errors(x, x_hat))
    if wall_time_s is not None:
        out["wall_time_s"] = round(float(wall_time_s), 3)
    return out


SELECTION_CRITERION = ("highest distinct_sids; ties broken by lower recon_mse, then by lower seed")


def select_best(summaries: list[dict]) -> int:
    """Index of the restart to keep (see SELECTION_CRITERION)."""
    if not summaries:
        raise ValueError("no restarts to choose from")
    return min(range(len(summaries)),
               key=lambda i: (-summaries[i]["distinct_sids"], summaries[i]["recon_mse"],
                              summaries[i].get("seed", i)))
