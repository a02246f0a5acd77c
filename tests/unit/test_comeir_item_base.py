"""``model.comeir_item_base`` (extension): ComeIR's memory-free item vector s^0 is the paper's Eq. 4 pool by
default, or that pool plus tm's concat merge, which keeps which code sits at which level."""
import torch

from comeir_dist.model.comeir_encoder import ComeIREncoder


def _encoder(item_base, ablations=()):
    torch.manual_seed(0)
    return ComeIREncoder(levels=3, codebook_size=8, d=16, d_mm=5, window=3, reads=torch.nn.ModuleDict(),
                         ablations=set(ablations), d_max=1 << 20, item_base=item_base)


def test_paper_pool_has_no_concat_merge_and_is_order_blind():
    enc = _encoder("pool", ["no_mm_scoring"])
    assert enc.w_cat is None
    tok = torch.randn(4, 3, 16)
    swapped = tok[:, [2, 0, 1]]  # the same tokens at other levels
    torch.testing.assert_close(enc.item_context(tok, torch.randn(4, 5)), enc.item_context(swapped, torch.randn(4, 5)))


def test_pool_concat_adds_the_concat_merge_to_the_pool():
    pool, both = _encoder("pool"), _encoder("pool_concat")
    both.w_mm.load_state_dict(pool.w_mm.state_dict())
    tok, mm = torch.randn(2, 6, 3, 16), torch.randn(2, 6, 5)
    expected = pool.item_context(tok, mm) + both.w_cat(tok.reshape(2, 6, 48))
    torch.testing.assert_close(both.item_context(tok, mm), expected)
    mean_only = _encoder("pool_concat", ["no_mm_scoring"])
    swapped = tok[..., [2, 0, 1], :]
    assert not torch.allclose(mean_only.item_context(tok, mm), mean_only.item_context(swapped, mm))


def test_pool_concat_is_built_from_config_and_memorises_a_handful_of_sequences(tmp_path):
    from comeir_dist.config.run import RunConfig
    from comeir_dist.train.samples import to_batch, training_samples
    from comeir_dist.train.setup import build_sharded_model, load_inputs
    from tests.fixtures import assert_overfits, make_tiny_dataset, tiny_run_config

    ds = make_tiny_dataset(tmp_path / "tiny")
    d = tiny_run_config(ds, tmp_path / "run").model_dump()
    d["model"]["comeir_item_base"] = "pool_concat"
    cfg = RunConfig.model_validate(d)
    torch.manual_seed(0)
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, torch.device("cpu"))
    assert model.encoder.w_cat is not None
    hist, tgt = training_samples(ds, 8)
    assert_overfits(model, to_batch(hist[:8], tgt[:8], "cpu"))
