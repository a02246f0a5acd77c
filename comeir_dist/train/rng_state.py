"""A process's RNG states (python ``random``, numpy global, torch CPU, CUDA) as plain JSON -- no pickle.

``capture()`` -> {"python": {"version", "state": [625 ints], "gauss_next"}, "numpy": {"name", "keys": [624 ints],
"pos", "has_gauss", "cached_gaussian"}, "torch": [uint8 ...], "cuda": [uint8 ...]?}. Floats round-trip exactly
through JSON (repr), so ``restore(json.loads(json.dumps(capture())))`` continues every stream bit for bit.
``restore`` validates types and ranges and raises ValueError (one line) on anything else.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": {"version": int(version), "state": [int(v) for v in state], "gauss_next": gauss},
           "numpy": {"name": str(name), "keys": [int(v) for v in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                     "cached_gaussian": float(cached)},
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def _ints(x, lo: int, hi: int, what: str) -> list[int]:
    if not (isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in x)):
        raise ValueError(f"RNG state: malformed {what}")
    return x


def _float_or_none(x, what: str):
    if x is not None and not (isinstance(x, (int, float)) and not isinstance(x, bool)):
        raise ValueError(f"RNG state: malformed {what}")
    return None if x is None else float(x)


def restore(st: dict) -> None:
    if not isinstance(st, dict) or not all(isinstance(st.get(k), (dict, list)) for k in ("python", "numpy", "torch")):
        raise ValueError("RNG state: malformed (python/numpy/torch sections)")
    py, npy = st["python"], st["numpy"]
    if not isinstance(py, dict) or not isinstance(npy, dict):
        raise ValueError("RNG state: malformed (python/numpy sections)")
    py_state = tuple(_ints(py.get("state"), 0, 2**32, "python state"))
    version = py.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or len(py_state) != 625:
        raise ValueError("RNG state: malformed python state")
    keys = np.array(_ints(npy.get("keys"), 0, 2**32 - 1, "numpy keys"), dtype=np.uint32)
    pos, has_gauss = npy.get("pos"), npy.get("has_gauss")
    if npy.get("name") != "MT19937" or len(keys) != 624 or not isinstance(pos, int) or not isinstance(has_gauss, int):
        raise ValueError("RNG state: malformed numpy state")
    torch_state = torch.tensor(_ints(st["torch"], 0, 255, "torch state"), dtype=torch.uint8)
    cuda = st.get("cuda")
    cuda_state = None if cuda is None else torch.tensor(_ints(cuda, 0, 255, "cuda state"), dtype=torch.uint8)
    random.setstate((version, py_state, _float_or_none(py.get("gauss_next"), "python gauss_next")))
    np.random.set_state(("MT19937", keys, pos, has_gauss,
                         _float_or_none(npy.get("cached_gaussian"), "numpy cached_gaussian") or 0.0))
    torch.set_rng_state(torch_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
