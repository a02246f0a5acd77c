#!/usr/bin/env python
"""Import a precomputed semantic-ID index as ``DATASET/sids/<name>/``, the files ``comeir quantize`` writes.

    python tools/import_sids.py --dataset runs/data/scientific --name rqvae index.json [--codebook-size 256]

FILE.json maps every catalogue item to its L codes, e.g. (LC-Rec / LETTER ``.index.json`` style)::

    {"item_id": ["<a_12>", "<b_3>", "<c_99>"], ...}     tokens: one letter prefix per level, code after '_'
    {"item_id": "<a_12><b_3><c_99>", ...}               the same tokens as one string
    {"item_id": [12, 3, 99], ...}                       plain integer codes

Keys are the items' raw ids as written in the input data (``items.parquet`` ``raw_id``), or their ``item_idx`` with
``--key item_idx``. Checked before anything is written: every item has the same number of levels; a level uses one
token prefix throughout (``<a_`` for level 1, ...); codes lie in [0, codebook size) (``--codebook-size`` or the
largest code + 1); every catalogue item is covered and no unknown item appears (both named). Collisions (items
sharing a SID) are counted and reported, not refused.

Written atomically (``codes.parquet``, ``codebooks.npy``, ``report.json``, with the product's ``write_sids``) and
loadable by ``comeir_dist.quant.sid_table.load_sids``. ``codebooks.npy`` (the frozen e^B of Eq. 2) is, per level,
the mean residual of the item embeddings (``item_emb.parquet``) assigned to each code -- the centroids RQ-KMeans
would have for these assignments (unused codes: zero) -- or ``--codebooks FILE.npy`` (``[L, C, D]`` float array).
Train with ``sid_method: <name>`` and ``engram.levels`` / ``engram.codebook_size`` equal to the imported ones.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_tool, sha256_of  # noqa: E402

PROG = "import_sids"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOKEN_RE = re.compile(r"^<([A-Za-z]+)_(\d+)>$")
_TOKENS_RE = re.compile(r"<([A-Za-z]+)_(\d+)>")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Import a precomputed semantic-ID index (JSON) as "
                                "DATASET/sids/NAME/ for `comeir train` (sid_method: NAME).")
    p.add_argument("index", metavar="FILE.json", help="{item: [codes or <a_N> tokens]} (see the module docstring)")
    p.add_argument("--dataset", required=True, help="prepared dataset dir (comeir prepare)")
    p.add_argument("--name", required=True, help="SID method name: writes DATASET/sids/NAME/")
    p.add_argument("--codebook-size", type=int, help="codes per level C (default: largest code + 1)")
    p.add_argument("--key", choices=("raw_id", "item_idx"), default="raw_id",
                   help="what the JSON keys are: the raw item ids (default) or item_idx")
    p.add_argument("--codebooks", metavar="FILE.npy", help="[L, C, D] codebook vectors (default: residual means "
                   "of DATASET/item_emb.parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DATASET/sids/NAME/")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _fail(msg: str):
    from comeir_dist.errors import UserError

    return UserError(msg)


def _show(v) -> str:
    from comeir_dist.data.readers import _show as show

    return show(v)


# ---- parsing ------------------------------------------------------------------------------------------------------
def parse_sid(path: Path, key: str, value) -> tuple[list[int], list[str] | None]:
    """(codes, token prefixes or None for plain integers) of one item's entry."""
    where = f"{path}: item {_show(key)}"
    if isinstance(value, str):
        tokens = _TOKENS_RE.findall(value)
        if not tokens or "".join(f"<{p}_{c}>" for p, c in tokens) != value.replace(" ", ""):
            raise _fail(f"{where}: {_show(value)} is not a sequence of <x_N> tokens")
        return [int(c) for _, c in tokens], [p for p, _ in tokens]
    if not isinstance(value, list) or not value:
        raise _fail(f"{where}: expected a non-empty list of codes or <x_N> tokens, got {_show(value)}")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value), None
    if all(isinstance(v, str) for v in value):
        codes, prefixes = [], []
        for v in value:
            m = _TOKEN_RE.match(v.strip())
            if m is None:
                if v.strip().isdigit():  # "12": a code written as text
                    codes.append(int(v.strip()))
                    prefixes.append("")
                    continue
                raise _fail(f"{where}: token {_show(v)} is neither <x_N> nor a number")
            prefixes.append(m.group(1))
            codes.append(int(m.group(2)))
        return codes, (prefixes if any(prefixes) else None)
    raise _fail(f"{where}: codes must all be integers or all <x_N> token strings, got {_show(value)}")


def read_index(path: Path) -> dict[str, tuple[list[int], list[str] | None]]:
    from comeir_dist.data.readers import _kind, _load_json

    data = _load_json(path)  # one-line errors: missing, empty, not UTF-8, malformed, duplicate keys
    if not isinstance(data, dict) or not data:
        raise _fail(f"{path}: expected a non-empty JSON object {{item: codes}}, got {_kind(data)}")
    return {str(k): parse_sid(path, k, v) for k, v in data.items()}


def build_codes(path: Path, entries: dict, catalogue: list[str], codebook_size: int | None):
    """(codes [I, L] int64 in item_idx order, codebook size); every check of the module docstring."""
    import numpy as np

    levels = {len(c) for c, _ in entries.values()}
    if len(levels) > 1:
        first = next(iter(entries.items()))
        other = next((k, c) for k, (c, _) in entries.items() if len(c) != len(first[1][0]))
        raise _fail(f"{path}: items have different numbers of levels: item {_show(first[0])} has "
                    f"{len(first[1][0])}, item {_show(other[0])} has {len(other[1])}")
    n_levels = levels.pop()
    level_prefix: list[str] = []
    for lv in range(n_levels):  # the prefix most items use at this level; the first item deviating is named
        counts = Counter(p[lv] if p else "" for _, p in entries.values())
        want = counts.most_common(1)[0][0]
        if len(counts) > 1:
            k, (_, prefixes) = next((k, e) for k, e in entries.items() if (e[1][lv] if e[1] else "") != want)
            got = prefixes[lv] if prefixes else ""
            raise _fail(f"{path}: item {_show(k)}, level {lv + 1}: token prefix {got or '(none)'!r} differs from "
                        f"{want or '(none)'!r} used by the other items at that level")
        level_prefix.append(want)
    index = {raw: n for n, raw in enumerate(catalogue)}
    unknown = [k for k in entries if k not in index]
    if unknown:
        raise _fail(f"{path}: {len(unknown)} item(s) not in the dataset's catalogue, e.g. {_show(unknown[0])}"
                    + ("" if len(unknown) < 2 else f", {_show(unknown[1])}"))
    missing = [raw for raw in catalogue if raw not in entries]
    if missing:
        raise _fail(f"{path}: {len(missing)} catalogue item(s) have no SID, e.g. {_show(missing[0])}"
                    + ("" if len(missing) < 2 else f", {_show(missing[1])}"))
    codes = np.array([entries[raw][0] for raw in catalogue], dtype=np.int64).reshape(len(catalogue), n_levels)
    top = int(codes.max())
    size = codebook_size if codebook_size is not None else top + 1
    if size < 1:
        raise _fail(f"--codebook-size {size}: must be >= 1")
    bad = np.argwhere((codes < 0) | (codes >= size))
    if len(bad):
        i, lv = (int(x) for x in bad[0])
        raise _fail(f"{path}: item {_show(catalogue[i])}, level {lv + 1}: code {int(codes[i, lv])} is outside "
                    f"[0, {size})" + (" (--codebook-size)" if codebook_size is not None else ""))
    if size >= 2 ** 31:
        raise _fail(f"{path}: code {top} does not fit the int32 code table")
    return codes, size, [p or None for p in level_prefix]


def residual_codebooks(emb, codes, size: int):
    """[L, C, D]: per level the mean residual of the items given each code (RQ-KMeans centroids), zeros if unused;
    also the reconstruction (sum of the chosen centroids)."""
    import numpy as np

    levels = codes.shape[1]
    residual = emb.astype(np.float64, copy=True)
    books = np.zeros((levels, size, emb.shape[1]), np.float64)
    for lv in range(levels):
        sums = np.zeros((size, emb.shape[1]), np.float64)
        np.add.at(sums, codes[:, lv], residual)
        counts = np.bincount(codes[:, lv], minlength=size)
        books[lv] = sums / np.maximum(counts, 1)[:, None]
        residual -= books[lv][codes[:, lv]]
    return books.astype(np.float32), (emb - residual).astype(np.float32)


def load_codebooks(path: Path, levels: int, size: int):
    import numpy as np

    if not path.is_file():
        raise _fail(f"--codebooks {path}: file not found")
    try:
        cb = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
        raise _fail(f"--codebooks {path}: not a .npy array ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    if cb.ndim != 3 or cb.shape[:2] != (levels, size) or not np.issubdtype(cb.dtype, np.number):
        raise _fail(f"--codebooks {path}: expected a numeric [L={levels}, C={size}, D] array, got {cb.dtype} "
                    f"{list(cb.shape)}")
    if not np.isfinite(cb).all():
        raise _fail(f"--codebooks {path}: contains NaN/inf")
    return cb.astype(np.float32)


# ---- import ---------------------------------------------------------------------------------------------------------
def import_sids(dataset: str | Path, name: str, index: str | Path, codebook_size: int | None = None,
                key: str = "raw_id", codebooks: str | Path | None = None, overwrite: bool = False) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from comeir_dist.data.dataset import check_dataset_dir
    from comeir_dist.data.schema import sids_dir
    from comeir_dist.quant.embed import META_FILE, load_item_embeddings
    from comeir_dist.quant.report import codes_fingerprint, recon_errors, sid_stats
    from comeir_dist.quant.run import write_sids
    from comeir_dist.utils.atomic import atomic_dir

    if not _NAME_RE.match(name):
        raise _fail(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it becomes the directory sids/{name})")
    if codebook_size is not None and codebook_size < 1:
        raise _fail(f"--codebook-size {codebook_size}: must be >= 1")
    ds = check_dataset_dir(dataset)
    out = sids_dir(ds, name)
    if out.exists() and not overwrite:
        raise _fail(f"{out}: already exists; pass --overwrite to replace it (or choose another --name)")
    index = Path(index)
    entries = read_index(index)
    raw_ids = pq.read_table(ds / "items.parquet", columns=["raw_id"]).column("raw_id").to_pylist()
    catalogue = raw_ids if key == "raw_id" else [str(i) for i in range(len(raw_ids))]
    codes, size, prefixes = build_codes(index, entries, catalogue, codebook_size)
    levels = codes.shape[1]
    recon = None
    if codebooks is not None:
        books = load_codebooks(Path(codebooks), levels, size)
        books_source = str(codebooks)
    else:
        if not (ds / "item_emb.parquet").is_file():
            raise _fail(f"{ds}: no item_emb.parquet to build the codebooks from: run `comeir embed --dataset {ds}` "
                        f"first (training needs it anyway) or pass --codebooks FILE.npy")
        emb = load_item_embeddings(ds)
        books, x_hat = residual_codebooks(emb, codes, size)
        recon = recon_errors(emb, x_hat)
        books_source = "residual means of item_emb.parquet per level and code (RQ-KMeans centroids of these codes)"
    stats = sid_stats(codes, size)
    emb_fp = None
    try:
        emb_fp = json.loads((ds / META_FILE).read_text()).get("input_fingerprint")
    except (OSError, ValueError, AttributeError):
        pass
    report = {
        "method": name, "levels": int(levels), "codebook_size": int(size), "items": stats["items"],
        "utilisation": stats["utilisation"], "used_codes": stats["used_codes"],
        "distinct_sids": stats["distinct_sids"], "distinct_fraction": stats["distinct_fraction"],
        "items_in_collisions": stats["items_in_collisions"], "max_items_per_sid": stats["max_items_per_sid"],
        **(recon or {}),
        "codebook_shape": list(books.shape),
        "imported": {"file": str(index.resolve()), "sha256": sha256_of(index), "key": key,
                     "token_prefixes": prefixes, "codebooks": books_source,
                     "codebook_size_from": "--codebook-size" if codebook_size is not None else "largest code + 1",
                     "tool": "tools/import_sids.py"},
        "embedding_fingerprint": emb_fp,
        "fingerprint": codes_fingerprint(codes),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:  # sids/<name>/ is written whole, like comeir quantize
        write_sids(tmp, codes.astype(np.int32), books, report)
    return {"sids": str(out), "levels": int(levels), "codebook_size": int(size), "items": stats["items"],
            "distinct_sids": stats["distinct_sids"], "collisions": stats["items"] - stats["distinct_sids"],
            "items_in_collisions": stats["items_in_collisions"], "fingerprint": report["fingerprint"],
            "train_with": {"sid_method": name, "engram.levels": int(levels), "engram.codebook_size": int(size)}}


def trainable_names() -> tuple[str, ...] | None:
    """The ``sid_method`` values RunConfig accepts (None when it takes any name)."""
    import typing

    from comeir_dist.config.run import RunConfig

    ann = RunConfig.model_fields["sid_method"].annotation
    return tuple(typing.get_args(ann)) if typing.get_origin(ann) is typing.Literal else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        rep = import_sids(args.dataset, args.name, args.index, args.codebook_size, args.key, args.codebooks,
                          args.overwrite)
        allowed = trainable_names()
        if allowed is not None and args.name not in allowed:
            rep["note"] = (f"this comeir-dist's RunConfig accepts sid_method in {{{', '.join(allowed)}}} only; "
                           f"import under one of those names to train on it")
            print(f"{PROG}: note: {rep['note']}", file=sys.stderr)
        print(json.dumps(rep, indent=1))
        return 0

    return run_tool(PROG, body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
