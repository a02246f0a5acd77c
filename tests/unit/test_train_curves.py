"""Training-curve plot from a run's train_log.jsonl."""
import json

from comeir_dist.train.curves import plot_training_curves, read_train_log


def _log(tmp_path, records):
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_png_from_loss_and_validation_records(tmp_path):
    _log(tmp_path, [{"step": 5, "loss": 4.1, "samples_per_s": 10.0, "lr": 1e-3, "elapsed_s": 1.0},
                    {"step": 10, "loss": 3.2, "samples_per_s": 11.0, "lr": 1e-3, "elapsed_s": 2.0},
                    {"step": 10, "valid": {"item/ndcg@10": 0.02, "item/hit@10": 0.05, "users": 16}}])
    losses, valid = read_train_log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in losses] == [5, 10] and valid == [{"step": 10, "item/ndcg@10": 0.02,
                                                                  "item/hit@10": 0.05, "users": 16}]
    out = plot_training_curves(tmp_path)
    assert out == tmp_path / "train_curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temp file left behind


def test_no_records_no_plot(tmp_path):
    _log(tmp_path, [])
    assert plot_training_curves(tmp_path) is None
    assert not (tmp_path / "train_curves.png").exists()
