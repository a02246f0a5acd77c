"""Last-level collision resolution for residual quantisers (optional, ``quantize.resolve_collisions``).

Nearest-codeword assignment (Eq. 29) gives near-duplicate items (colour/size variants whose
embeddings differ by far less than the quantisation error) the same SID. After the codebooks are
fitted, items that share a full SID are spread over the *last* level, in the spirit of LC-Rec's
uniform semantic mapping:

* only the last level changes; L, the codebooks and codes of all earlier levels stay as fitted,
  and items that do not collide keep their argmin code;
* in a group of items sharing one SID, the item nearest to the shared code keeps it; the others (in
  order of their distance to it) each take their nearest last-level code not yet used by any item
  with the same (L-1)-prefix;
* a prefix that already holds more than C items cannot be separated: the extra items keep their
  argmin code and stay in collision.

Each moved item is then reconstructed from the code it was given, so the reconstruction error reported
by the quantiser includes the price of the move.
"""
from __future__ import annotations

import numpy as np


def resolve_last_level(codes: np.ndarray, last_dists: np.ndarray) -> tuple[np.ndarray, int]:
    """Spread colliding items over the last level.

    codes: [n, L] argmin codes; last_dists: [n, C] squared distances of each item's last-level
    residual r_{L-1} to every last-level codeword. Returns (new codes, number of items moved).
    """
    codes = np.array(codes, dtype=np.int64, copy=True)
    n, levels = codes.shape
    if n == 0:
        return codes, 0
    _, sid_inv, sid_cnt = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    colliding = sid_cnt[sid_inv.reshape(-1)] > 1
    if not colliding.any():
        return codes, 0
    if levels > 1:
        _, prefix = np.unique(codes[:, :-1], axis=0, return_inverse=True)
        prefix = prefix.reshape(-1)
    else:
        prefix = np.zeros(n, dtype=np.int64)
    moved = 0
    order = np.argsort(prefix, kind="stable")
    bounds = np.flatnonzero(np.diff(prefix[order])) + 1
    for members in np.split(order, bounds):
        if not colliding[members].any():
            continue
        last = codes[members, -1]
        used = set(last.tolist())
        movers = []
        for v in np.unique(last):
            holders = members[last == v]
            if len(holders) < 2:
                continue
            holders = sorted(holders.tolist(), key=lambda i: (last_dists[i, v], i))
            movers.extend(holders[1:])
        movers.sort(key=lambda i: (last_dists[i, codes[i, -1]], i))
        for i in movers:
            for c in np.argsort(last_dists[i], kind="stable"):
                if int(c) not in used:
                    codes[i, -1] = int(c)
                    used.add(int(c))
                    moved += 1
                    break
    return codes, moved
