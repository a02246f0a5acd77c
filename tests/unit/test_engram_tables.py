"""Engram tables as an EBC + one-KJT-per-forward key batches (unsharded module)."""
import torch

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.patterns import encode_prefix, inter_keys, intra_keys
from comeir_dist.engram.sizing import TableSpec
from comeir_dist.engram.tables import EngramIndex, build_engram_collection, collection_features, make_kjt, unpack

CFG = EngramConfig(s_t=0.5, s_s=0.125, d_m=16)


def _weights(ebc):
    return {n: b.weight for n, b in ebc.embedding_bags.items()}


def test_build_collection():
    idx = EngramIndex.from_config(CFG)
    ebc = build_engram_collection(idx.specs, device="cpu", init_scale=0.02)
    feats = collection_features(ebc)
    assert list(feats) == idx.features
    w = _weights(ebc)
    for s in idx.specs:
        assert tuple(w[s.name].shape) == (s.rows, s.dim)
        assert float(w[s.name].detach().abs().max()) <= 0.02
    meta = build_engram_collection(idx.specs, device="meta", dtype="fp16")
    assert meta.embedding_bags[idx.features[0]].weight.device.type == "meta"
    assert meta.embedding_bags[idx.features[0]].weight.dtype == torch.float16


def test_make_kjt_and_unpack_with_empty_bags():
    specs = [TableSpec("a", "inter", 1, 1, 0, 11, 4, 10), TableSpec("b", "inter", 1, 1, 1, 13, 4, 10),
             TableSpec("c", "intra", 2, 1, 0, 17, 2, 10)]
    ebc = build_engram_collection(specs, device="cpu")
    ids = {"a": torch.tensor([1, 2, 3]), "c": torch.tensor([5])}
    valid = {"a": torch.tensor([True, False, True])}
    kjt = make_kjt(ids, valid, features=["a", "b", "c"])
    assert kjt.stride() == 3 and kjt.lengths().tolist() == [1, 0, 1, 0, 0, 0, 1, 0, 0]
    out = unpack(ebc(kjt), {"a": 3, "c": 1})
    w = _weights(ebc)
    assert torch.equal(out["a"][0], w["a"][1]) and (out["a"][1] == 0).all() and torch.equal(out["a"][2], w["a"][3])
    assert torch.equal(out["c"][0], w["c"][5])


def test_key_batch_one_lookup_matches_tables_and_masks():
    idx = EngramIndex.from_config(CFG)
    ebc = build_engram_collection(idx.specs, device="cpu")
    w = _weights(ebc)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 128, (2, 4, 3), generator=g)
    mask = torch.tensor([[False, True, True, True], [True] * 4])  # left padding
    batch = idx.new_batch()
    handles = {}
    for level in (2, 3):
        for o in idx.orders("intra", level):
            handles[("intra", level, o)] = batch.add_key("intra", level, o, *intra_keys(codes, mask, level, o))
    for level in (1, 2, 3):
        units = encode_prefix(codes, level, CFG.codebook_size, CFG.d_max)
        for o in idx.orders("inter", level):
            k, v = inter_keys(units, mask, o)
            handles[("inter", level, o)] = batch.add_key("inter", level, o, k, v)
    assert batch.kjt().keys() == idx.features
    out = batch.lookup(ebc)  # ONE call of the collection
    for (mem, level, o), h in handles.items():
        a = out[h]
        assert a.shape == (2, 4, idx.address_dim(mem, level, o)) == (2, 4, 16)
        if mem == "intra":
            keys, valid = intra_keys(codes, mask, level, o)
        else:
            keys, valid = inter_keys(encode_prefix(codes, level, 128, CFG.d_max), mask, o)
        heads = idx.heads(mem, level, o)
        ref = torch.cat([w[s.name][idx.hashers[s.name](keys)] for s in heads], -1) * valid[..., None]
        assert torch.equal(a, ref), (mem, level, o)
        assert (a[~valid] == 0).all()
    # gradients reach exactly the looked-up rows, never rows of invalid keys
    loss = sum(o.sum() for o in out)
    loss.backward()
    s = idx.heads("inter", 1, 3)[0]
    keys, valid = inter_keys(encode_prefix(codes, 1, 128, CFG.d_max), mask, 3)
    rows = set(idx.hashers[s.name](keys)[valid].tolist())
    touched = set(ebc.embedding_bags[s.name].weight.grad.abs().sum(1).nonzero().flatten().tolist())
    assert touched == rows


def test_add_ids_and_repeated_requests_same_table():
    idx = EngramIndex.from_config(CFG)
    ebc = build_engram_collection(idx.specs, device="cpu")
    name = idx.features[-1]
    b = idx.new_batch()
    h1 = b.add_ids(name, torch.tensor([[1, 2], [3, 4]]))
    h2 = b.add_ids(name, torch.tensor([5, 6, 7]), torch.tensor([True, False, True]))
    r = b.lookup(ebc)
    w = ebc.embedding_bags[name].weight
    assert r[h1].shape == (2, 2, w.shape[1]) and torch.equal(r[h1][1, 0], w[3])
    assert torch.equal(r[h2][0], w[5]) and (r[h2][1] == 0).all() and torch.equal(r[h2][2], w[7])
    assert b.stride == 7


def test_pad_stride_keeps_bags():
    from comeir_dist.engram.tables import pad_kjt_stride

    specs = [TableSpec("a", "inter", 1, 1, 0, 11, 4, 10), TableSpec("b", "inter", 1, 1, 1, 13, 4, 10)]
    ebc = build_engram_collection(specs, device="cpu")
    idx = EngramIndex(specs, 0)
    b = idx.new_batch()
    h = b.add_ids("a", torch.tensor([1, 2]), torch.tensor([True, False]))
    hb = b.add_ids("b", torch.tensor([4]))
    k = b.kjt(min_stride=5)
    assert k.stride() == 5 and k.lengths().tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert pad_kjt_stride(b.kjt(), 2) is not None and b.kjt().stride() == 2
    out = b.unpack(ebc(k))
    assert torch.equal(out[h][0], ebc.embedding_bags["a"].weight[1]) and (out[h][1] == 0).all()
    assert torch.equal(out[hb][0], ebc.embedding_bags["b"].weight[4])
