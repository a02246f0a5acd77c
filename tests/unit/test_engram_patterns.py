"""Lookup patterns: prefix units, intra/inter keys, decode-side keys, sequence starts and padding."""
import pytest
import torch

from comeir_dist.engram.patterns import (
    candidate_prefix_units,
    encode_prefix,
    inter_candidate_keys,
    inter_keys,
    intra_candidate_keys,
    intra_keys,
    last_positions,
)

C = 128


def _codes(b=2, n=5, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (b, n, L), generator=g)


def test_encode_prefix_exact_and_reduced():
    codes = torch.tensor([[5, 7, 9]])
    assert encode_prefix(codes, 1, C, 2_097_152).item() == 5
    assert encode_prefix(codes, 2, C, 2_097_152).item() == 5 * 128 + 7
    assert encode_prefix(codes, 3, C, 2_097_152).item() == (5 * 128 + 7) * 128 + 9  # C^3 == D_max
    # reduced domain: value mod D_max
    assert encode_prefix(codes, 3, C, 1000).item() == ((5 * 128 + 7) * 128 + 9) % 1000
    big = torch.full((4, 6), C - 1)
    u = encode_prefix(big, 6, C, 2_097_152)
    assert int(u.max()) < 2_097_152 and u.tolist() == [(C**6 - 1) % 2_097_152] * 4


def test_candidate_prefix_units_match_encode():
    codes = _codes(1, 6, 3)[0]  # [6, 3]
    prefix = codes[:, :2]
    cand = torch.arange(C).expand(6, C)
    u = candidate_prefix_units(prefix, cand, C, 2_097_152)
    full = torch.cat([prefix.unsqueeze(1).expand(6, C, 2), cand.unsqueeze(-1)], -1)
    assert torch.equal(u, encode_prefix(full, 3, C, 2_097_152))
    u1 = candidate_prefix_units(codes[:, :0], torch.arange(C), C, 2_097_152)  # level 1
    assert torch.equal(u1, torch.arange(C).expand(6, C))


def test_intra_keys():
    codes = _codes()
    mask = torch.tensor([[False, True, True, True, True], [True] * 5])
    k, v = intra_keys(codes, mask, level=3, order=2)
    assert k.shape == (2, 5, 2) and torch.equal(v, mask)
    assert torch.equal(k[1], codes[1, :, 1:3])
    assert torch.equal(k[0, 0], torch.zeros(2, dtype=torch.long))
    k1, _ = intra_keys(codes, mask, level=2, order=1)
    assert torch.equal(k1[1, :, 0], codes[1, :, 1])
    with pytest.raises(ValueError):
        intra_keys(codes, mask, level=2, order=3)


def test_intra_candidate_keys():
    prefix = torch.tensor([[3, 4], [5, 6]])
    cand = torch.tensor([[1, 2, 9], [7, 8, 0]])
    k = intra_candidate_keys(prefix, cand, order=3)
    assert k.shape == (2, 3, 3) and k[0, 2].tolist() == [3, 4, 9] and k[1, 0].tolist() == [5, 6, 7]
    assert intra_candidate_keys(prefix, cand, order=2)[1, 1].tolist() == [6, 8]
    assert intra_candidate_keys(prefix, cand, order=1)[0, 1].tolist() == [2]
    # matches the encoder-side key of the completed SID
    codes = torch.tensor([[[3, 4, 9]]])
    ek, _ = intra_keys(codes, torch.ones(1, 1, dtype=torch.bool), level=3, order=3)
    assert ek[0, 0].tolist() == k[0, 2].tolist()


def test_inter_keys_left_padding_and_start():
    units = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    k, v = inter_keys(units, mask, order=3)
    assert k.shape == (2, 5, 3)
    assert v.tolist() == [[False, False, False, False, True], [False, False, True, True, True]]
    assert k[0, 4].tolist() == [11, 12, 13]
    assert k[1, 2].tolist() == [21, 22, 23] and k[1, 4].tolist() == [23, 24, 25]
    assert (k[~v] == 0).all()
    k1, v1 = inter_keys(units, mask, order=1)
    assert torch.equal(v1, mask) and torch.equal(k1[..., 0], units * mask)
    k2, v2 = inter_keys(units, mask, order=2)
    assert v2[0].tolist() == [False, False, False, True, True] and k2[0, 3].tolist() == [11, 12]


def test_inter_keys_right_padding_same_keys():
    left_u = torch.tensor([[0, 0, 11, 12, 13]])
    left_m = torch.tensor([[False, False, True, True, True]])
    right_u = torch.tensor([[11, 12, 13, 99, 99]])
    right_m = torch.tensor([[True, True, True, False, False]])
    for o in (1, 2, 3):
        kl, vl = inter_keys(left_u, left_m, o)
        kr, vr = inter_keys(right_u, right_m, o)
        assert kl[vl].tolist() == kr[vr].tolist()


def test_inter_candidate_keys():
    units = torch.tensor([[0, 0, 11, 12, 13], [0, 0, 0, 0, 31], [0] * 5])
    mask = torch.tensor([[False, False, True, True, True], [False] * 4 + [True], [False] * 5])
    cand = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert last_positions(mask).tolist() == [4, 4, -1]
    k3, v3 = inter_candidate_keys(units, mask, cand, order=3)
    assert k3.shape == (3, 2, 3)
    assert v3.tolist() == [[True, True], [False, False], [False, False]]
    assert k3[0, 1].tolist() == [12, 13, 2]
    k2, v2 = inter_candidate_keys(units, mask, cand, order=2)
    assert v2.tolist() == [[True, True], [True, True], [False, False]]
    assert k2[1, 0].tolist() == [31, 3]
    k1, v1 = inter_candidate_keys(units, mask, cand, order=1)
    assert v1.all() and k1[2, 1].tolist() == [6]
    # right padding gives the same keys
    ur = torch.tensor([[11, 12, 13, 0, 0]])
    mr = torch.tensor([[True, True, True, False, False]])
    kr, vr = inter_candidate_keys(ur, mr, cand[:1], order=3)
    assert kr.tolist() == k3[:1].tolist() and vr.all()


def test_decode_key_equals_encoder_key_of_appended_sequence():
    # Eq. 24: candidate key == encoder key at position N+1 of [history; candidate]
    codes = _codes(1, 6, 3, seed=5)
    mask = torch.ones(1, 6, dtype=torch.bool)
    hist, target = codes[:, :5], codes[:, 5]
    for level in (1, 2, 3):
        hu = encode_prefix(hist, level, C, 2_097_152)
        cu = candidate_prefix_units(target[:, :level - 1], target[:, level - 1:level], C, 2_097_152)
        allu = encode_prefix(codes, level, C, 2_097_152)
        for o in (1, 2, 3):
            kd, vd = inter_candidate_keys(hu, mask[:, :5], cu, o)
            ke, ve = inter_keys(allu, mask, o)
            assert vd.item() and ve[0, 5].item()
            assert kd[0, 0].tolist() == ke[0, 5].tolist()
