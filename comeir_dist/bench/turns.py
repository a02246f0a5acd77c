"""Turn-taking between run groups alive at the same time, so that their steps never overlap.

``comeir bench train`` compares a 1-worker and an N-worker group. Measured one after the other, the ratio of
their step times also measures how the (shared, noisy) machine changed between the two runs: on the 2-core
machines the 1-worker step moved by 25% between runs minutes apart. With ``bench.interleave`` both groups are
spawned together and take turns: the parent hands the machine to one group for a unit of work (all warm-up
steps, then ``interleave`` timed steps at a time, then the profiled steps), waits until every rank of that
group reports back, and hands it to the other (ABBA order: a slow phase of the machine hits both). A group
that is not on turn blocks in ``Queue.get`` and uses no CPU.

Both sides derive the units from the same settings with :func:`units`, so they always agree.
"""
from __future__ import annotations

import math
import queue
import time
from dataclasses import dataclass


def units(warmup: int, steps: int, block: int, profile_steps: int) -> list[tuple[str, int]]:
    """The work units of one group, in order: ``("warmup", n)``, ``("timed", n)`` x ceil(steps / block),
    ``("profile", 0)``."""
    out: list[tuple[str, int]] = []
    if warmup > 0:
        out.append(("warmup", warmup))
    for k in range(math.ceil(steps / block)):
        out.append(("timed", min(block, steps - k * block)))
    if profile_steps > 0:
        out.append(("profile", 0))
    return out


@dataclass
class Turn:
    """A rank's side: ``wait()`` blocks until the parent gives its group the machine, ``done()`` reports back.
    ``None`` queues (no turn-taking) make both no-ops."""

    go: object = None    # this rank's queue of tokens from the parent
    back: object = None  # the group's queue of finished units (shared by its ranks)
    rank: int = 0

    def wait(self) -> None:
        if self.go is not None:
            self.go.get()

    def done(self) -> None:
        if self.back is not None:
            self.back.put(self.rank)


class TurnTaker:
    """The parent's side for several groups: ``groups[label] = (go queues per rank, back queue)``."""

    def __init__(self, groups: dict, alive, timeout_s: float):
        self.groups = groups
        self.alive = alive            # () -> False as soon as a rank failed or exited
        self.deadline = time.monotonic() + timeout_s

    def give(self, label: str) -> float:
        """One unit for group ``label``; returns its wall time. Raises RuntimeError if a rank died or timed out."""
        gos, back = self.groups[label]
        t0 = time.perf_counter()
        for q in gos:
            q.put(1)
        got = 0
        while got < len(gos):
            try:
                back.get(timeout=1.0)
                got += 1
            except queue.Empty:
                if not self.alive() or time.monotonic() > self.deadline:
                    raise RuntimeError(f"bench train: group {label} stopped during its turn") from None
        return time.perf_counter() - t0

    def run(self, order: list[str], n_units: int) -> None:
        """Every unit of every group, alternating the order of the groups from one unit to the next."""
        for u in range(n_units):
            for label in (order if u % 2 == 0 else order[::-1]):
                self.give(label)
