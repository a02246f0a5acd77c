"""best/ writes one process's Engram tables from views of the live fused buffers, not from copies (an s_T = 8
table set is 12 GB in fp16: a copy for the checkpoint did not fit next to the model on 24 GB), and the file holds
each buffer once."""
import torch

from comeir_dist.parallel.engram_tables import full_tables_state
from comeir_dist.train.setup import build_sharded_model, load_inputs
from tests.fixtures import make_tiny_dataset, tiny_run_config


def test_view_state_equals_copy_shares_storage_and_saves_each_buffer_once(tmp_path):
    ds = make_tiny_dataset(tmp_path / "data")
    cfg = tiny_run_config(ds, tmp_path / "run")
    sids, emb = load_inputs(cfg)
    model = build_sharded_model(cfg, sids, emb, torch.device("cpu"))
    copies, views = full_tables_state(model.tables), full_tables_state(model.tables, copy=False)
    assert copies.keys() == views.keys()
    for g in copies:
        assert copies[g].keys() == views[g].keys()
        ptrs = {v.untyped_storage().data_ptr() for v in views[g].values()}
        assert len(ptrs) == 1, f"{g}: the views of one group share its fused buffer"
        for k in copies[g]:
            torch.testing.assert_close(views[g][k], copies[g][k], rtol=0, atol=0)
            assert copies[g][k].untyped_storage().data_ptr() not in ptrs
    torch.save(views, tmp_path / "tables.pt")
    payload = sum(v.numel() * v.element_size() for g in copies for v in copies[g].values())
    assert (tmp_path / "tables.pt").stat().st_size < 1.2 * payload + 65536
    back = torch.load(tmp_path / "tables.pt", weights_only=True, mmap=True)
    for g in copies:
        for k in copies[g]:
            torch.testing.assert_close(back[g][k], copies[g][k], rtol=0, atol=0)
