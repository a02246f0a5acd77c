"""torch.distributed.checkpoint storage without pickle: the checkpoint metadata is JSON (``.metadata.json``).

The stock ``FileSystemWriter`` pickles the ``Metadata`` object into ``.metadata`` and ``FileSystemReader``
unpickles it -- loading a checkpoint directory would run whatever a crafted ``.metadata`` contains. Here:

* :class:`JsonMetadataWriter` writes the same information as JSON (tensors only: table weights and optimizer
  state; a non-tensor entry is refused at save time) and records the files this rank wrote (``written``), so
  the caller can fsync and checksum them;
* :class:`JsonMetadataReader` parses that JSON strictly (known dtypes, plain file names, integer offsets) and
  refuses any read item that is not a tensor: the only deserialiser left is ``torch.load(weights_only=True)``
  of the ``.distcp`` tensor blobs (inside DCP's reader).

A directory written by the stock writer (``.metadata``) is not readable here: it has no ``.metadata.json``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType

METADATA_FILE = ".metadata.json"
FORMAT = "comeir-dcp-json/1"
_DTYPES = {name: getattr(torch, name) for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32",
                                                    "int16", "int8", "uint8", "bool")}
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# ---- Metadata <-> JSON ----------------------------------------------------------------------------------
def _ints(x) -> list[int]:
    return [int(v) for v in x]


def metadata_to_json(md: Metadata) -> dict:
    tensors = {}
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            raise ValueError(f"{fqn}: only tensors are stored in a JSON-metadata checkpoint, got {type(m).__name__}")
        p = m.properties
        if p.layout != torch.strided:
            raise ValueError(f"{fqn}: layout {p.layout} is not supported")
        dtype = str(p.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"{fqn}: dtype {p.dtype} is not supported")
        tensors[fqn] = {"dtype": dtype, "requires_grad": bool(p.requires_grad), "pin_memory": bool(p.pin_memory),
                        "size": _ints(m.size),
                        "chunks": [{"offsets": _ints(c.offsets), "sizes": _ints(c.sizes)} for c in m.chunks]}
    storage = []
    for idx, info in (md.storage_data or {}).items():
        storage.append({"fqn": idx.fqn, "offset": None if idx.offset is None else _ints(idx.offset),
                        "index": idx.index, "file": info.relative_path, "file_offset": int(info.offset),
                        "length": int(info.length),
                        "transforms": None if info.transform_descriptors is None else list(info.transform_descriptors)})
    planner = None
    if md.planner_data is not None:
        planner = {str(k): list(v) for k, v in dict(md.planner_data).items()}
    save_id = md.storage_meta.save_id if md.storage_meta is not None else None
    return {"format": FORMAT, "version": md.version, "tensors": tensors, "storage": storage, "planner_data": planner,
            "save_id": save_id}


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"{METADATA_FILE}: malformed ({what})")


def _int_list(x, what: str) -> list[int]:
    _need(isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x), what)
    return x


def metadata_from_json(data) -> Metadata:
    """Strict inverse of :func:`metadata_to_json`; ValueError (one line) on anything unexpected."""
    _need(isinstance(data, dict) and data.get("format") == FORMAT, "format")
    tensors = data.get("tensors")
    _need(isinstance(tensors, dict), "tensors")
    sdm = {}
    for fqn, t in tensors.items():
        _need(isinstance(t, dict) and t.get("dtype") in _DTYPES, f"dtype of {fqn[:80]}")
        _need(isinstance(t.get("chunks"), list), f"chunks of {fqn[:80]}")
        props = TensorProperties(dtype=_DTYPES[t["dtype"]], layout=torch.strided,
                                 requires_grad=bool(t.get("requires_grad", False)),
                                 memory_format=torch.contiguous_format, pin_memory=bool(t.get("pin_memory", False)))
        chunks = []
        for c in t["chunks"]:
            _need(isinstance(c, dict), f"chunk of {fqn[:80]}")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(_int_list(c.get("offsets"), "chunk offsets")),
                                               sizes=torch.Size(_int_list(c.get("sizes"), "chunk sizes"))))
        sdm[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(_int_list(t.get("size"), "size")),
                                         chunks=chunks)
    storage = {}
    _need(isinstance(data.get("storage"), list), "storage")
    for s in data["storage"]:
        _need(isinstance(s, dict) and isinstance(s.get("fqn"), str) and s["fqn"] in sdm, "storage fqn")
        name = s.get("file")
        _need(isinstance(name, str) and bool(_FILE_RE.match(name)) and name != METADATA_FILE, "storage file name")
        offset = None if s.get("offset") is None else _int_list(s["offset"], "storage offset")
        index = s.get("index")
        _need(index is None or (isinstance(index, int) and not isinstance(index, bool)), "storage index")
        transforms = s.get("transforms")
        _need(transforms is None or (isinstance(transforms, list) and all(isinstance(x, str) for x in transforms)),
              "transforms")
        storage[MetadataIndex(s["fqn"], offset, index)] = _StorageInfo(
            relative_path=name, offset=_int_list([s.get("file_offset")], "file offset")[0],
            length=_int_list([s.get("length")], "length")[0], transform_descriptors=transforms)
    planner = data.get("planner_data")
    if planner is not None:
        _need(isinstance(planner, dict) and all(isinstance(v, list) and all(isinstance(x, (str, int)) for x in v)
                                                for v in planner.values()), "planner_data")
        planner = {k: tuple(v) for k, v in planner.items()}
    version = data.get("version")
    _need(version is None or isinstance(version, str), "version")
    return Metadata(state_dict_metadata=sdm, planner_data=planner, storage_data=storage,
                    storage_meta=StorageMeta(save_id=data.get("save_id") if isinstance(data.get("save_id"), str)
                                             else None), version=version)


# ---- storage writer / reader ----------------------------------------------------------------------------
class JsonMetadataWriter(FileSystemWriter):
    """FileSystemWriter that writes ``.metadata.json`` instead of the pickled ``.metadata`` (fsynced, atomic)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, sync_files=True, overwrite=True)
        self.written: list[str] = []  # file names (relative to path) this rank wrote

    def _get_metadata_path(self, rank=None) -> Path:
        return Path(self.fs.concat_path(self.path, METADATA_FILE))

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        self.written += sorted({wr.storage_data.relative_path for wr in fut.value()})
        return fut

    def finish(self, metadata: Metadata, results) -> None:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

        from comeir_dist.train.checkpoint_integrity import durable_write_text

        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for wr_list in results for wr in wr_list}
        metadata.storage_meta = self.storage_meta()
        durable_write_text(self._get_metadata_path(), json.dumps(metadata_to_json(metadata)))
        self.written.append(METADATA_FILE)


class JsonMetadataReader(FileSystemReader):
    """FileSystemReader for :class:`JsonMetadataWriter` checkpoints; never unpickles."""

    def _get_metadata_path(self, rank=None) -> Path:
        return Path(self.fs.concat_path(self.path, METADATA_FILE))

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path()
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: missing (not a checkpoint written with JSON metadata)") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not valid JSON") from None
        md = metadata_from_json(data)
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        bad = [ri for ri in plan.items if ri.type != LoadItemType.TENSOR]
        if bad:
            raise ValueError(f"{self.path}: refusing to deserialise non-tensor entry {bad[0].dest_index.fqn!r}")
        return super().read_data(plan, planner)
