"""engram.short_keys: inter n-gram keys longer than the history so far (paper Eq. 13/19).

* ``drop`` reproduces the keys (and hashed rows) of the code before the option, bit for bit;
* ``shorten`` hashes only real items plus a marker outside the unit domain, never padding;
* a shortened key never systematically equals a full key of the same order (nor the order-k key);
* decode-time candidate keys (MemoryHead.request) equal the encoder's keys of the appended sequence;
* a checkpoint config without the field is ``drop``; resuming it with ``shorten`` is refused.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from comeir_dist.engram.config import EngramConfig, upgrade_saved_config
from comeir_dist.engram.hashing import build_hashers, hash_keys, hash_multipliers
from comeir_dist.engram.patterns import (
    candidate_prefix_units,
    encode_prefix,
    inter_candidate_keys,
    inter_keys,
    short_key_marker,
    unit_domain,
)
from comeir_dist.engram.sizing import table_specs
from comeir_dist.errors import UserError
from comeir_dist.model.comeir_encoder import ComeIREncoder, history_units
from comeir_dist.model.memory_head import MemoryHead

C, L, DMAX = 128, 3, 2_097_152
MODES = ("drop", "shorten")

# sha256 of every key, validity mask and hashed row id that the encoder and the head register for
# ``_fixed_batch`` (``_run_all``), computed ONCE with the code before engram.short_keys existed (git HEAD
# 088bcb2, no option): ``drop`` must keep producing exactly these.
PRE_OPTION_DIGEST = "19cf21cab6a7e18fd4a305abae4caeedf6911f791d445900c2f8404bbe333d08"


# ---- a recording stand-in for LookupPass (no torchrec needed) ---------------------------------------------
class _Lookup:
    def __init__(self, cfg: EngramConfig):
        self.cfg = cfg
        self.short_keys = cfg.short_keys
        self.specs = table_specs(cfg)
        self.hashers = build_hashers(self.specs, cfg.hash_seed)

    def orders(self, memory, level):
        return sorted({s.order for s in self.specs if s.memory == memory and s.level == level})


class _RecordingPass:
    """Records every ``add`` with the bucket ids of every head (zeroed where invalid)."""

    def __init__(self, cfg: EngramConfig):
        self.lookup = _Lookup(cfg)
        self.calls = []
        self.fold = None  # not cross-fitted: every key reads and trains its own row

    def add(self, memory, level, order, keys, valid, fold=None):
        valid = valid.bool().expand(keys.shape[:-1])
        ids = [self.lookup.hashers[s.name](keys) * valid for s in self.lookup.specs
               if (s.memory, s.level, s.order) == (memory, level, order)]
        self.calls.append((memory, level, order, keys.clone(), valid.clone(), ids))
        return len(self.calls) - 1

    def find(self, memory, level, order, start=0):
        return [c for c in self.calls[start:] if c[:3] == (memory, level, order)]


def _digest(calls) -> str:
    h = hashlib.sha256()
    for m, l, o, k, v, ids in calls:
        h.update(f"{m}{l}{o}".encode())
        h.update((k * v.unsqueeze(-1)).long().contiguous().numpy().tobytes())
        h.update(v.contiguous().numpy().tobytes())
        for i in ids:
            h.update(i.long().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fixed_batch():
    g = torch.Generator().manual_seed(123)
    b, n = 5, 6
    codes = torch.randint(0, C, (b, n, L), generator=g)
    lengths = torch.tensor([6, 3, 2, 1, 0])
    mask = torch.arange(n).unsqueeze(0) >= (n - lengths).unsqueeze(1)  # left padding
    return codes, mask


def _modules():
    enc = ComeIREncoder(L, C, 8, 4, 3, nn.ModuleDict(), set(), DMAX)
    head = MemoryHead(L, C, 8, 3, nn.ModuleDict(), set(), DMAX)
    return enc, head


def _run_all(cfg: EngramConfig):
    codes, mask = _fixed_batch()
    enc, head = _modules()
    units = history_units(codes, L, C, DMAX)
    lp = _RecordingPass(cfg)
    enc.request(lp, codes, mask, units)
    g = torch.Generator().manual_seed(7)
    for level in range(1, L + 1):
        prefixes = torch.randint(0, C, (codes.shape[0], 2, level - 1), generator=g)
        cand = torch.rand(codes.shape[0], 2, C, generator=g) < 0.05
        head.request(lp, level, prefixes, cand, units, mask)
    return lp.calls


# ---- drop == the code before the option -------------------------------------------------------------------
def test_drop_reproduces_pre_option_keys_bit_for_bit():
    assert EngramConfig().short_keys == "drop"
    assert _digest(_run_all(EngramConfig(short_keys="drop"))) == PRE_OPTION_DIGEST
    # and the rule matters: shorten registers other keys for the same batch (1- and 2-item rows, empty row)
    assert _digest(_run_all(EngramConfig(short_keys="shorten"))) != PRE_OPTION_DIGEST


def test_drop_explicit_values_unchanged():
    units = torch.tensor([[0, 0, 11, 12, 13], [0, 0, 0, 0, 31]])
    mask = units > 0
    k, v = inter_keys(units, mask, order=3)
    assert v.tolist() == [[False, False, False, False, True], [False] * 5]
    assert k[0, 4].tolist() == [11, 12, 13] and int(k[~v].abs().sum()) == 0
    k, v = inter_candidate_keys(units, mask, torch.tensor([[7], [8]]), order=2)
    assert v.tolist() == [[True], [True]] and k[:, 0].tolist() == [[13, 7], [31, 8]]
    k, v = inter_candidate_keys(units, mask, torch.tensor([[7], [8]]), order=3)
    assert v.tolist() == [[True], [False]] and k[1, 0].tolist() == [0, 0, 0]


# ---- shorten: the key of the paper's clamped suffix, without padding --------------------------------------
def test_shorten_keys_explicit():
    m = short_key_marker(2, C, DMAX)
    assert m == unit_domain(2, C, DMAX) == C * C
    units = torch.tensor([[0, 0, 11, 12, 13], [0, 0, 0, 0, 31], [0] * 5])
    mask = units > 0
    k, v = inter_keys(units, mask, order=3, short_marker=m)
    assert v.tolist() == mask.tolist()  # valid wherever the lookup position is a real item
    assert k[0, 2].tolist() == [m, m, 11] and k[0, 3].tolist() == [m, 11, 12] and k[0, 4].tolist() == [11, 12, 13]
    assert k[1, 4].tolist() == [m, m, 31]
    assert int(k[~v].abs().sum()) == 0  # padding positions: zeros (looked up as empty bags)
    kc, vc = inter_candidate_keys(units, mask, torch.tensor([[7], [8], [9]]), order=3, short_marker=m)
    assert vc.all()
    assert kc[:, 0].tolist() == [[12, 13, 7], [m, 31, 8], [m, m, 9]]  # the empty history too


@pytest.mark.parametrize("mode", MODES)
def test_padding_never_enters_a_key(mode):
    """Changing the padding units, the padding length or the padding side leaves every real key unchanged."""
    cfg = EngramConfig(short_keys=mode)
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 1]
    real = [torch.randint(0, C, (n, L), generator=g) for n in lengths]

    def batch(width, pad_code, right=False):
        codes = torch.full((len(real), width, L), pad_code)
        mask = torch.zeros(len(real), width, dtype=torch.bool)
        for i, r in enumerate(real):
            sl = slice(0, len(r)) if right else slice(width - len(r), width)
            codes[i, sl], mask[i, sl] = r, True
        return codes, mask

    def real_keys(codes, mask):
        enc, head = _modules()
        units = history_units(codes, L, C, DMAX)
        lp = _RecordingPass(cfg)
        enc.request(lp, codes, mask, units)
        out = {}
        for m, l, o, k, v, ids in lp.calls:
            out[(m, l, o)] = [(k[i][mask[i]].tolist(), v[i][mask[i]].tolist(), [h[i][mask[i]].tolist() for h in ids])
                              for i in range(len(real))]
        n0 = len(lp.calls)
        cand = torch.zeros(len(real), 1, C, dtype=torch.bool)
        cand[:, 0, 5] = True
        for level in (1, 2, 3):
            head.request(lp, level, torch.full((len(real), 1, level - 1), 3), cand, units, mask)
        for m, l, o, k, v, ids in lp.calls[n0:]:
            if m == "inter":
                out[("head", l, o)] = (k.tolist(), v.tolist(), [h.tolist() for h in ids])
        return out

    base = real_keys(*batch(5, 0))
    assert real_keys(*batch(5, C - 1)) == base          # other padding id
    assert real_keys(*batch(9, 77)) == base             # longer padding
    assert real_keys(*batch(5, 42, right=True)) == base  # right padding
    if mode == "shorten":  # the marker, never a padding unit, fills the missing elements
        m1 = short_key_marker(1, C, DMAX)
        keys, valid, _ = base[("inter", 1, 3)][2]  # the 1-item history, order 3
        assert keys == [[m1, m1, int(real[2][0, 0])]] and valid == [True]


def test_short_key_never_systematically_equals_a_full_key():
    """Before the modulus, Eq. 39 of (M, a, b) differs from that of (u, a, b) for EVERY real unit u (odd
    multipliers: x -> x*m mod 2^62 is a bijection and M is no unit); with zero padding it would equal the
    full key u = 0. Buckets: no head agrees for any u (H ~ 32^3 here, so a chance match is rare)."""
    cfg = EngramConfig(short_keys="shorten")
    level, order = 1, 3
    d = unit_domain(level, C, DMAX)
    mk = short_key_marker(level, C, DMAX)
    g = torch.Generator().manual_seed(3)
    for a, b in torch.randint(0, d, (20, 2), generator=g).tolist():
        full = torch.stack([torch.arange(d), torch.full((d,), a), torch.full((d,), b)], dim=1)  # (u, a, b)
        short = torch.tensor([[mk, a, b]])
        for head in range(cfg.k_t):
            m = hash_multipliers(cfg.hash_seed, "inter", level, order, head)
            pre_full = hash_keys(full, m, 1 << 62)  # modulus 2^62: the XOR accumulator itself
            pre_short = hash_keys(short, m, 1 << 62)
            assert not bool((pre_full == pre_short).any())
            assert int(hash_keys(torch.tensor([[0, a, b]]), m, 1 << 62)) == int(pre_full[0])  # why a marker
        specs = [s for s in table_specs(cfg) if (s.memory, s.level, s.order) == ("inter", level, order)]
        hashers = build_hashers(specs, cfg.hash_seed)
        rows_full = torch.stack([hashers[s.name](full) for s in specs], -1)
        rows_short = torch.stack([hashers[s.name](short) for s in specs], -1)
        assert not bool((rows_full == rows_short).all(-1).any())
    # one item vs two items: (M, M, b) != (M, a, b) for every a
    for head in range(cfg.k_t):
        m = hash_multipliers(cfg.hash_seed, "inter", level, order, head)
        two = torch.stack([torch.full((d,), mk), torch.arange(d), torch.full((d,), 5)], 1)
        assert not bool((hash_keys(two, m, 1 << 62) == hash_keys(torch.tensor([[mk, mk, 5]]), m, 1 << 62)).any())


def test_shortened_key_is_read_from_its_own_order_tables():
    """A 2-item history: the order-3 read is (M, a, b) in the order-3 tables, the order-2 read the genuine
    (a, b) in the order-2 tables (own multipliers and moduli), so the two never share rows by construction."""
    cfg = EngramConfig(short_keys="shorten")
    codes = torch.randint(0, C, (1, 2, L), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, 2, dtype=torch.bool)
    enc, _ = _modules()
    lp = _RecordingPass(cfg)
    enc.request(lp, codes, mask, history_units(codes, L, C, DMAX))
    (_, _, _, k3, v3, _), = lp.find("inter", 1, 3)
    (_, _, _, k2, v2, _), = lp.find("inter", 1, 2)
    a, b = codes[0, :, 0].tolist()
    mk = short_key_marker(1, C, DMAX)
    assert k3[0, 1].tolist() == [mk, a, b] and k2[0, 1].tolist() == [a, b] and v3.all() and v2.all()
    names3 = {s.name for s in table_specs(cfg) if (s.memory, s.level, s.order) == ("inter", 1, 3)}
    names2 = {s.name for s in table_specs(cfg) if (s.memory, s.level, s.order) == ("inter", 1, 2)}
    assert names3.isdisjoint(names2)


# ---- decode-time candidate keys == teacher-forced keys --------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hist_len", [0, 1, 2, 4])
def test_decode_candidate_keys_equal_teacher_forced(mode, hist_len):
    """MemoryHead.request (used by teacher forcing AND beam search) builds, for the target x after history h,
    exactly the key the encoder builds at x's position in [h; x] (Eq. 24), under either rule."""
    cfg = EngramConfig(short_keys=mode)
    n = 5
    g = torch.Generator().manual_seed(10 + hist_len)
    seq = torch.randint(0, C, (1, hist_len + 1, L), generator=g)
    hist, target = seq[:, :hist_len], seq[0, hist_len]
    # history left-padded to n; the appended sequence [h; x] left-padded to n + 1
    hcodes = torch.cat([torch.zeros(1, n - hist_len, L, dtype=torch.long), hist], 1)
    hmask = torch.arange(n).unsqueeze(0) >= n - hist_len
    acodes = torch.cat([torch.zeros(1, n - hist_len, L, dtype=torch.long), seq], 1)
    amask = torch.arange(n + 1).unsqueeze(0) >= n - hist_len
    enc, head = _modules()
    lp = _RecordingPass(cfg)
    enc.request(lp, acodes, amask, history_units(acodes, L, C, DMAX))
    hunits = history_units(hcodes, L, C, DMAX)
    for level in range(1, L + 1):
        cand = torch.zeros(1, 1, C, dtype=torch.bool)
        cand[0, 0, target[level - 1]] = True
        start = len(lp.calls)
        head.request(lp, level, target[:level - 1].view(1, 1, -1), cand, hunits, hmask)
        for o in lp.lookup.orders("inter", level):
            (_, _, _, ke, ve, ide), = lp.find("inter", level, o)[:1]
            (_, _, _, kd, vd, idd), = lp.find("inter", level, o, start)
            assert vd[0].item() == ve[0, -1].item() == (mode == "shorten" or hist_len + 1 >= o)
            assert kd[0].tolist() == ke[0, -1].tolist()
            assert [h[0].item() for h in idd] == [h[0, -1].item() for h in ide]
    # the same holds for the pattern functions with the candidate's units (Eq. 22)
    for level in range(1, L + 1):
        marker = None if mode == "drop" else short_key_marker(level, C, DMAX)
        cu = candidate_prefix_units(target[:level - 1].view(1, -1), target[level - 1:level].view(1, 1), C, DMAX)
        for o in (1, 2, 3):
            kd, vd = inter_candidate_keys(encode_prefix(hcodes, level, C, DMAX), hmask, cu, o, marker)
            ke, ve = inter_keys(encode_prefix(acodes, level, C, DMAX), amask, o, marker)
            assert kd[0, 0].tolist() == ke[0, -1].tolist() and vd[0, 0].item() == ve[0, -1].item()


def test_shorten_model_forward_and_decode_consistent(tmp_path):
    """End to end on the tiny dataset with short histories: level logits of the decoder equal the
    teacher-forced ones under shorten, and short histories now receive inter memory that drop does not."""
    from comeir_dist.model.history import HistoryBatch
    from comeir_dist.train.setup import build_sharded_model, load_inputs
    from tests.fixtures import assert_decode_matches_teacher_forcing, make_tiny_dataset, tiny_run_config

    ds = make_tiny_dataset(tmp_path / "ds")
    cfg = tiny_run_config(ds, tmp_path / "run")
    cfg.engram.short_keys = "shorten"
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, torch.device("cpu"))
    model.eval()
    items = torch.tensor([[-1, -1, -1, 3], [-1, -1, 5, 6], [-1, -1, -1, -1], [1, 2, 3, 4]])
    batch = HistoryBatch(items, torch.tensor([7, 8, 9, 10]))
    codes = model.catalog.item_codes(batch.target)
    tf = assert_decode_matches_teacher_forcing(model, batch)
    with torch.no_grad():
        # more padding changes nothing under shorten either
        more = HistoryBatch(torch.cat([torch.full((4, 3), -1), items], 1), batch.target)
        for x, y in zip(tf, model.level_logits(more, codes)):
            v = torch.isfinite(x)
            torch.testing.assert_close(x[v], y[v], rtol=1e-4, atol=1e-4)
        # the same weights under drop: the 1-item history (row 0) loses its order-2/3 inter reads
        model.lookup.short_keys = "drop"
        dropped = model.level_logits(batch, codes)
        model.lookup.short_keys = "shorten"
        v = torch.isfinite(tf[0][0])
        assert not torch.allclose(tf[0][0][v], dropped[0][0][v])


# ---- config and checkpoints -------------------------------------------------------------------------------
def test_config_values():
    assert EngramConfig(short_keys="shorten").short_keys == "shorten"
    with pytest.raises(ValueError):
        EngramConfig(short_keys="clamp")
    with pytest.raises(ValueError):
        EngramConfig(short_keys="shorten", d_max=2**62)


def test_saved_config_without_the_key_is_drop():
    old = EngramConfig().model_dump(mode="json")
    old.pop("short_keys")
    cfg = {"engram": dict(old), "seed": 1}
    up = upgrade_saved_config(cfg)
    assert up["engram"]["short_keys"] == "drop"  # explicit: independent of the current class default
    assert EngramConfig.model_validate(up["engram"]).short_keys == "drop"
    kept = {"engram": {**old, "short_keys": "shorten"}}
    assert upgrade_saved_config(kept)["engram"]["short_keys"] == "shorten"
    assert upgrade_saved_config(None) is None and upgrade_saved_config({"seed": 1}) == {"seed": 1}


def _old_run_config_dict(tmp_path):
    from tests.fixtures import tiny_run_config

    cfg = tiny_run_config(tmp_path / "ds", tmp_path / "run")
    data = cfg.model_dump(mode="json")
    del data["engram"]["short_keys"]  # written before the option existed
    return cfg, data


def test_old_checkpoints_load_as_drop(tmp_path):
    from comeir_dist.train import checkpoint as ckpt
    from comeir_dist.train import checkpoint_simple as cs

    _, data = _old_run_config_dict(tmp_path)
    best = tmp_path / "best"
    best.mkdir()
    (best / "meta.json").write_text(json.dumps({"config": data, "step": 1, "sid_fingerprint": "fp"}))
    (best / "COMMITTED").write_text("1")
    assert cs.read_meta(best)["config"]["engram"]["short_keys"] == "drop"
    step = tmp_path / "step-1"
    step.mkdir()
    (step / "state.json").write_text(json.dumps({"format": ckpt.FORMAT, "config": data}))
    (step / "COMMITTED").write_text("1")
    assert ckpt.read_state(step)["config"]["engram"]["short_keys"] == "drop"


class _NoTables:
    pass


def _state(data, n=10):
    from comeir_dist.train import checkpoint as ckpt

    return {"format": ckpt.FORMAT, "sid_fingerprint": "fp", "hash_multipliers": {}, "config": data,
            "sampler": {"n": n}}


def test_resume_old_drop_checkpoint(tmp_path):
    from comeir_dist.train import checkpoint as ckpt

    cfg, data = _old_run_config_dict(tmp_path)
    assert cfg.engram.short_keys == "drop"
    ckpt.check_compatible(tmp_path, _state(json.loads(json.dumps(data))), cfg, _NoTables(), "fp", 10)  # accepted
    cfg.engram.short_keys = "shorten"
    with pytest.raises(UserError) as exc:
        ckpt.check_compatible(tmp_path, _state(json.loads(json.dumps(data))), cfg, _NoTables(), "fp", 10)
    msg = str(exc.value)
    assert "\n" not in msg and "short_keys=drop" in msg and "shorten" in msg
    # and the other way round: a shorten checkpoint resumed with drop
    shorten = json.loads(json.dumps(data))
    shorten["engram"]["short_keys"] = "shorten"
    cfg.engram.short_keys = "drop"
    with pytest.raises(UserError, match="short_keys=shorten"):
        ckpt.check_compatible(tmp_path, _state(shorten), cfg, _NoTables(), "fp", 10)


def test_resume_checkpoint_that_predates_an_option(tmp_path):
    """A checkpoint saved before a model/engram option existed resumes (the option's default is the behaviour it
    was trained with); a saved value that differs from the config is still refused."""
    from comeir_dist.train import checkpoint as ckpt

    cfg, data = _old_run_config_dict(tmp_path)
    saved = json.loads(json.dumps(cfg.model_dump(mode="json")))
    for section, option in (("model", "merge_input_norm"), ("model", "merge_value_init"), ("engram", "cross_fit")):
        del saved[section][option]
    del saved["model"]["backbone"]["head_dim"]  # nested sections too (at its default here)
    ckpt.check_compatible(tmp_path, _state(json.loads(json.dumps(saved))), cfg, _NoTables(), "fp", 10)  # accepted
    cfg.model.merge_input_norm = True  # the checkpoint was trained without it
    with pytest.raises(UserError, match="config 'model' differs"):
        ckpt.check_compatible(tmp_path, _state(json.loads(json.dumps(saved))), cfg, _NoTables(), "fp", 10)


def test_load_checkpoint_into_refuses_other_rule(tmp_path):
    from comeir_dist.train import checkpoint_simple as cs

    _, data = _old_run_config_dict(tmp_path)

    class _Lookup:  # mimics ComeIRModel.lookup (EngramLookup): no tables, a shorten config
        def __init__(self):
            self.index = {}
            self.cfg = EngramConfig(short_keys="shorten")

    class _Model:
        def __init__(self):
            self.lookup = _Lookup()

    meta = {"config": data, "sid_fingerprint": "fp", "hash_multipliers": {}}
    with pytest.raises(UserError, match="short_keys=drop"):
        cs.load_checkpoint_into(Path(tmp_path), _Model(), meta, "fp")
