import math
import time

import pytest
import torch

from comeir_dist.decode.beam import BeamResult, beam_search, masked_log_softmax
from comeir_dist.decode.trie import PrefixTrie

C, L = 4, 3


def _catalog(n_items=30, seed=0, C=C, L=L):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (n_items, L), generator=g)


class TableStepFn:
    """Deterministic random raw logits that depend on (user, level, full prefix)."""

    def __init__(self, B, C=C, L=L, seed=1, scale=3.0):
        g = torch.Generator().manual_seed(seed)
        self.C = C
        self.table = [torch.randn(B, C ** level, C, generator=g) * scale + 5.0 for level in range(L)]

    def key(self, prefix):
        k = 0
        for c in prefix:
            k = k * self.C + int(c)
        return k

    def __call__(self, level, prefixes, parent):
        B, K, _ = prefixes.shape
        keys = torch.zeros(B, K, dtype=torch.long)
        for t in range(level):
            keys = keys * self.C + prefixes[..., t]
        b = torch.arange(B).unsqueeze(1).expand(B, K)
        return self.table[level][b, keys]

    def logprob(self, b, prefix, x, trie):
        """Reference Eq. 11: softmax over the catalog-valid children only."""
        valid = trie.valid_mask(torch.tensor([list(prefix)], dtype=torch.long).reshape(1, len(prefix)))[0]
        logits = self.table[len(prefix)][b, self.key(prefix)]
        vals = [float(logits[y]) for y in range(self.C) if valid[y]]
        m = max(vals)
        lse = m + math.log(sum(math.exp(v - m) for v in vals))
        assert valid[x]
        return float(logits[x]) - lse


def _brute_force(step, trie, B):
    sids = [tuple(r) for r in trie.sid_codes.tolist()]
    out = []
    for b in range(B):
        scored = []
        for s in sids:
            score = sum(step.logprob(b, s[:t], s[t], trie) for t in range(len(s)))
            scored.append((score, s))
        scored.sort(key=lambda z: -z[0])
        out.append(scored)
    return out


def _reference_beam(step, trie, B, beam_size):
    """Straightforward per-user Python beam search."""
    out = []
    for b in range(B):
        beams = [((), 0.0)]
        for level in range(trie.num_levels):
            cand = []
            for prefix, s in beams:
                valid = trie.valid_mask(torch.tensor([list(prefix)], dtype=torch.long).reshape(1, level))[0]
                for x in range(trie.num_codes):
                    if valid[x]:
                        cand.append((prefix + (x,), s + step.logprob(b, prefix, x, trie)))
            cand.sort(key=lambda z: -z[1])
            beams = cand[:beam_size]
        out.append(beams)
    return out


def test_full_beam_equals_brute_force_ranking():
    B = 5
    trie = PrefixTrie.from_codes(_catalog(), C)
    step = TableStepFn(B)
    S = trie.num_sids
    res = beam_search(step, trie, B, L, beam_size=C ** L, device="cpu")  # >= number of distinct SIDs
    assert isinstance(res, BeamResult)
    assert res.codes.shape == (B, C ** L, L) and res.scores.shape == (B, C ** L)
    ref = _brute_force(step, trie, B)
    for b in range(B):
        n_live = int(res.valid[b].sum())
        assert n_live == S
        got = [tuple(r) for r in res.codes[b, :S].tolist()]
        assert got == [s for _, s in ref[b]]
        torch.testing.assert_close(res.scores[b, :S], torch.tensor([sc for sc, _ in ref[b]]), atol=1e-4, rtol=1e-5)
        # extra slots are dead: -inf and no SID
        assert torch.isinf(res.scores[b, S:]).all() and (res.scores[b, S:] < 0).all()
        assert (res.codes[b, S:] == -1).all()
    # scores descending
    live = res.scores[:, :S]
    assert (live[:, :-1] >= live[:, 1:]).all()
    # probabilities of all catalog SIDs sum to 1 per user (Eq. 11 normalises over valid codes)
    torch.testing.assert_close(live.exp().sum(1), torch.ones(B), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
def test_small_beam_matches_python_reference(beam_size):
    B = 6
    trie = PrefixTrie.from_codes(_catalog(seed=3), C)
    step = TableStepFn(B, seed=7)
    res = beam_search(step, trie, B, L, beam_size=beam_size, device="cpu")
    ref = _reference_beam(step, trie, B, beam_size)
    for b in range(B):
        n = len(ref[b])
        assert [tuple(r) for r in res.codes[b, :n].tolist()] == [p for p, _ in ref[b]]
        torch.testing.assert_close(res.scores[b, :n], torch.tensor([s for _, s in ref[b]]), atol=1e-4, rtol=1e-5)
        assert not res.valid[b, n:].any()
    # top-1 of a greedy/beam search equals the brute-force top-1 when each level's choice dominates
    if beam_size == 1:
        assert res.codes.shape == (B, 1, L)


def test_top1_equals_brute_force_when_prefix_monotone():
    # logits depend only on (user, level, code): the ranking is prefix-monotone when all children
    # sets are identical, i.e. on a full catalog; then greedy (beam 1) finds the global best.
    B, C2, L2 = 4, 3, 3
    import itertools
    codes = torch.tensor(list(itertools.product(range(C2), repeat=L2)))
    trie = PrefixTrie.from_codes(codes, C2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(L2, B, C2, generator=g)
    step = lambda level, prefixes, parent: w[level].unsqueeze(1).expand(-1, prefixes.shape[1], -1)  # noqa: E731
    full = beam_search(step, trie, B, L2, beam_size=C2 ** L2)
    greedy = beam_search(step, trie, B, L2, beam_size=1)
    assert torch.equal(greedy.codes[:, 0], full.codes[:, 0])
    torch.testing.assert_close(greedy.scores[:, 0], full.scores[:, 0])


def test_returned_sids_are_in_catalog_large():
    B, C2, L2, I = 16, 128, 3, 2000
    g = torch.Generator().manual_seed(0)
    # clustered codes so that prefixes have few children
    codes = torch.randint(0, 16, (I, L2), generator=g) * 8 + torch.randint(0, 8, (I, L2), generator=g)
    codes[:50] = codes[50:100]  # collisions
    trie = PrefixTrie.from_codes(codes, C2)
    w = torch.randn(B, C2, generator=g)

    def step(level, prefixes, parent):
        return w.unsqueeze(1) + 0.1 * prefixes.sum(-1, keepdim=True).float()

    res = beam_search(step, trie, B, beam_size=20)
    assert res.codes.shape == (B, 20, L2)
    assert res.valid.all()
    assert trie.contains(res.codes).all()
    # distinct SIDs per user
    keys = trie.encode(res.codes)
    for b in range(B):
        assert len(set(keys[b].tolist())) == 20


def test_parent_reorder_contract():
    B, beam = 3, 4
    trie = PrefixTrie.from_codes(_catalog(n_items=25, seed=5), C)
    table = TableStepFn(B, seed=11)
    calls = []

    class CachedStep:
        """Keeps a per-beam 'KV cache' (the codes it has seen) and reorders it with ``parent``."""

        def __init__(self):
            self.state = None

        def __call__(self, level, prefixes, parent):
            calls.append((level, tuple(prefixes.shape), None if parent is None else tuple(parent.shape)))
            if level == 0:
                assert parent is None and prefixes.shape == (B, 1, 0)
                self.state = torch.zeros(B, 1, 0, dtype=torch.long)
            else:
                assert parent is not None and parent.shape == prefixes.shape[:2]
                assert parent.dtype == torch.long
                assert (parent >= 0).all() and (parent < self.state.shape[1]).all()
                reordered = self.state.gather(1, parent.unsqueeze(-1).expand(-1, -1, self.state.shape[-1]))
                # the cached prefix of the parent beam equals the new prefix minus its last code
                assert torch.equal(reordered, prefixes[..., :-1])
                self.state = torch.cat([reordered, prefixes[..., -1:]], -1)
            assert torch.equal(self.state, prefixes)
            assert ((prefixes >= 0) & (prefixes < C)).all()  # safe for embedding look-ups, even dead slots
            return table(level, prefixes, parent)

    res = beam_search(CachedStep(), trie, B, L, beam_size=beam)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert calls[0][1] == (B, 1, 0) and calls[0][2] is None
    assert calls[1][1] == (B, beam, 1) and calls[1][2] == (B, beam)
    assert calls[2][1] == (B, beam, 2) and calls[2][2] == (B, beam)
    ref = beam_search(table, trie, B, L, beam_size=beam)
    assert torch.equal(res.codes, ref.codes)


def test_fewer_valid_continuations_than_beam():
    codes = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 1, 3], [2, 2, 2]])  # 3 distinct SIDs
    trie = PrefixTrie.from_codes(codes, 4)
    B = 2
    step = lambda level, p, parent: torch.zeros(B, p.shape[1], 4)  # noqa: E731
    res = beam_search(step, trie, B, 3, beam_size=5)
    assert res.valid.sum(1).tolist() == [3, 3]
    assert trie.contains(res.codes[:, :3]).all()
    assert (res.codes[:, 3:] == -1).all() and torch.isneginf(res.scores[:, 3:]).all()
    # uniform over valid children: [0,1,2] and [0,1,3] have log(1/2 * 1 * 1/2), [2,2,2] has log(1/2)
    torch.testing.assert_close(res.scores[0, 0], torch.tensor(math.log(0.5)))
    torch.testing.assert_close(res.scores[0, 1:3], torch.full((2,), math.log(0.25)))


def test_logits_shift_invariance_and_model_masking():
    B = 4
    trie = PrefixTrie.from_codes(_catalog(seed=9), C)
    step = TableStepFn(B, seed=2)
    shifted = lambda level, p, parent: torch.log_softmax(step(level, p, parent), -1) - 7.0  # noqa: E731
    a = beam_search(step, trie, B, beam_size=6)
    b = beam_search(shifted, trie, B, beam_size=6)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)

    # a model that itself forbids code 0 at level 0 (-inf) never produces SIDs starting with 0
    def forbid(level, p, parent):
        out = step(level, p, parent).clone()
        if level == 0:
            out[..., 0] = float("-inf")
        return out

    res = beam_search(forbid, trie, B, beam_size=64)
    live = res.valid
    assert (res.codes[..., 0][live] != 0).all()
    assert not torch.isnan(res.scores).any()


def test_bad_step_fn_and_args():
    trie = PrefixTrie.from_codes(_catalog(), C)
    with pytest.raises(ValueError):
        beam_search(lambda l, p, par: torch.zeros(2, C), trie, 2, beam_size=3)
    with pytest.raises(ValueError):
        beam_search(lambda l, p, par: torch.zeros(2, p.shape[1], C), trie, 2, levels=2, beam_size=3)
    with pytest.raises(FloatingPointError):
        beam_search(lambda l, p, par: torch.full((2, p.shape[1], C), float("nan")), trie, 2, beam_size=3)


def test_masked_log_softmax_rows_without_valid_codes():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    valid = torch.tensor([[True, False, True], [False, False, False]])
    out = masked_log_softmax(logits, valid)
    torch.testing.assert_close(out[0, [0, 2]], torch.log_softmax(torch.tensor([1.0, 3.0]), 0))
    assert torch.isneginf(out[0, 1]) and torch.isneginf(out[1]).all()


def test_speed_realistic_shape():
    B, K, C2, L2, I = 512, 20, 128, 3, 20000
    g = torch.Generator().manual_seed(0)
    trie = PrefixTrie.from_codes(torch.randint(0, C2, (I, L2), generator=g), C2)
    w = torch.randn(B, 1, C2, generator=g)
    step = lambda level, p, parent: w.expand(-1, p.shape[1], -1)  # noqa: E731
    beam_search(step, trie, B, beam_size=K)  # warm-up
    t0 = time.perf_counter()
    res = beam_search(step, trie, B, beam_size=K)
    dt = time.perf_counter() - t0
    assert res.valid.all()
    assert dt < 2.0, f"beam search too slow: {dt:.3f}s"


def test_garbage_model_output_on_dead_slots_is_ignored():
    # 2 distinct SIDs, beam 4: dead slots exist from level 0 on; the model returns NaN/+inf for them
    codes = torch.tensor([[1, 0], [3, 2]])
    trie = PrefixTrie.from_codes(codes, 4)
    B = 3

    class Step:
        def __call__(self, level, p, parent):
            out = torch.randn(B, p.shape[1], 4)
            if level == 1:
                out[:, 2:, :] = float("nan")  # slots 2, 3 are dead after level 0
                out[:, 2:, 0] = float("inf")
            return out

    res = beam_search(Step(), trie, B, beam_size=4)
    assert res.valid.sum(1).tolist() == [2, 2, 2]
    assert not torch.isnan(res.scores).any()
    assert trie.contains(res.codes[:, :2]).all()
    assert (res.codes[:, 2:] == -1).all()
