"""Power law ``y = a * P**b`` fitted by least squares in log-log space (paper Section 4.4, Figure 3)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    a: float
    b: float  # exponent
    r2: float  # coefficient of determination of the log-log regression
    n: int  # points used

    def predict(self, p) -> np.ndarray:
        return self.a * np.power(np.asarray(p, dtype=np.float64), self.b)

    def to_dict(self) -> dict:
        return asdict(self)

    def formula(self, y: str = "Hit@5", x: str = "P") -> str:
        return f"{y} = {self.a:.4g} * {x}^{self.b:.4f}"


def fit_power_law(p: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """``log y = log a + b log p`` by ordinary least squares. Needs >= 2 points with p > 0, y > 0 and at
    least two distinct p (ValueError otherwise)."""
    x = np.asarray(p, dtype=np.float64)
    v = np.asarray(y, dtype=np.float64)
    if x.shape != v.shape or x.ndim != 1:
        raise ValueError("p and y must be 1-d sequences of the same length")
    if len(x) < 2:
        raise ValueError(f"a power-law fit needs at least 2 points, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(v)) and np.all(x > 0) and np.all(v > 0)):
        raise ValueError("a power-law fit needs finite p > 0 and y > 0")
    lx, ly = np.log(x), np.log(v)
    if np.ptp(lx) == 0:
        raise ValueError("a power-law fit needs at least two distinct parameter counts")
    b, loga = np.polyfit(lx, ly, 1)
    pred = loga + b * lx
    ss_res = float(np.sum((ly - pred) ** 2))
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(float(math.exp(loga)), float(b), r2, int(len(x)))
