"""The MovieLens CSV layout (ratings.csv + movies.csv) read by `comeir prepare --input DIR`.

Synthetic directories in tmp_path; one optional test reads the real ml-latest-small from ../shared (research
licence: read in place, never copied) and is skipped when it is absent."""
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from comeir_dist.cli import main
from comeir_dist.config.pipeline import PrepareConfig
from comeir_dist.data.dataset_output import input_fingerprint
from comeir_dist.data.movielens import genres_text, is_movielens_dir, read_movielens_dir
from comeir_dist.data.prepare import run_prepare
from comeir_dist.data.readers import read_raw
from comeir_dist.errors import UserError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "movielens-small"

MOVIES = [
    "movieId,title,genres",
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
    '2,"American President, The (1995)",Comedy|Drama|Romance',
    "3,La cravate (1957),(no genres listed)",
    "10,GoldenEye (1995),Action",
    "007,Dr. No (1962),Action|Thriller",
]
# user 2 rates 10, 1, 3 in the same second (rows sorted by userId then movieId, as GroupLens ships them);
# user 10 has an earlier rating further down the file; ratings of any value count (0.5 included)
RATINGS = [
    "userId,movieId,rating,timestamp",
    "1,2,4.0,300",
    "1,3,0.5,100",
    "1,10,5.0,200",
    "2,1,3.0,500",
    "2,3,2.0,500",
    "2,007,4.5,400",
    "2,10,1.0,500",
    "10,1,4.0,50",
    "10,2,4.0,40",
]


def write_ml(d: Path, ratings=RATINGS, movies=MOVIES) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if ratings is not None:
        (d / "ratings.csv").write_text("\n".join(ratings) + "\n")
    if movies is not None:
        (d / "movies.csv").write_text("\n".join(movies) + "\n")
    return d


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert len(msg.splitlines()) == 1
    return msg


def test_time_order_tie_rule_and_ids(tmp_path):
    raw = read_movielens_dir(write_ml(tmp_path / "ml"))
    # ties (user 2 at t=500) keep ratings.csv row order, i.e. ascending movieId as GroupLens sorts the file
    assert raw.sequences == {"1": ["3", "10", "2"], "2": ["007", "1", "3", "10"], "10": ["2", "1"]}
    assert all(isinstance(u, str) for u in raw.sequences)
    assert "007" in raw.items and "7" not in raw.items  # ids exactly as written
    assert raw.source == str(tmp_path / "ml")


def test_tie_rule_is_file_row_order(tmp_path):
    # same second, rows not in movieId order: the file order wins (stable), not the id
    ratings = ["userId,movieId,rating,timestamp", "5,10,1,7", "5,2,1,7", "5,1,1,7", "5,3,1,6"]
    raw = read_movielens_dir(write_ml(tmp_path / "ml", ratings=ratings))
    assert raw.sequences == {"5": ["3", "10", "2", "1"]}


def test_item_text_fields(tmp_path):
    items = read_movielens_dir(write_ml(tmp_path / "ml")).items
    assert items["1"] == {"title": "Toy Story (1995)", "description": None, "brand": None,
                          "categories": "Adventure, Animation, Children, Comedy, Fantasy"}
    assert items["2"]["title"] == "American President, The (1995)"  # quoted CSV field with a comma
    assert items["3"]["categories"] is None  # "(no genres listed)"
    assert items["007"]["categories"] == "Action, Thriller"
    assert genres_text("") is None and genres_text(None) is None and genres_text("Drama") == "Drama"


def test_dispatch_from_read_raw_and_detection(tmp_path):
    d = write_ml(tmp_path / "ml")
    assert is_movielens_dir(d) and read_raw(str(d), None).sequences == read_movielens_dir(d).sequences
    assert not is_movielens_dir(tmp_path / "empty") and not is_movielens_dir(d / "ratings.csv")


def test_movie_missing_from_movies_csv_is_one_line_error(tmp_path):
    ratings = RATINGS + ["10,999,3.0,60", "10,998,3.0,61", "1,999,3.0,70"]
    with pytest.raises(UserError) as e:
        read_movielens_dir(write_ml(tmp_path / "ml", ratings=ratings))
    msg = one_line(e)
    assert "ratings.csv: row 10, column 'movieId': movie '999' is absent from" in msg
    assert "movies.csv" in msg and "2 rated movie id(s)" in msg


def test_missing_file_and_bad_values_are_one_line_errors(tmp_path):
    with pytest.raises(UserError) as e:
        read_movielens_dir(write_ml(tmp_path / "a", movies=None))
    assert "movies.csv: file not found" in one_line(e)
    with pytest.raises(UserError) as e:
        read_movielens_dir(write_ml(tmp_path / "b", ratings=RATINGS[:2] + ["1,3,0.5,"]))
    assert "row 2, column 'timestamp': empty value" in one_line(e)
    with pytest.raises(UserError) as e:
        read_movielens_dir(write_ml(tmp_path / "c", movies=MOVIES + ["11,,Drama"]))
    assert "movies.csv: row 6 (movieId '11') has neither 'title'" in one_line(e)
    with pytest.raises(UserError) as e:
        read_movielens_dir(write_ml(tmp_path / "d", ratings=["userId,itemId,rating,timestamp", "1,1,1,1"]))
    assert "missing column(s) movieId" in one_line(e)


def test_cli_error_exit_2(tmp_path, capsys):
    d = write_ml(tmp_path / "ml", ratings=RATINGS + ["1,999,3.0,70"])
    rc = main(["prepare", "--input", str(d), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err and "'999'" in err
    assert not (tmp_path / "ds").exists()


def test_fingerprint_covers_the_csv_files(tmp_path):
    d = write_ml(tmp_path / "ml")
    cfg = PrepareConfig(input=str(d), out=str(tmp_path / "ds"))
    before = input_fingerprint(cfg)
    (d / "ratings.csv").write_text("\n".join(RATINGS[:-1]) + "\n")
    assert input_fingerprint(cfg) != before  # a changed ratings.csv must not count as "up to date"


def test_prepare_keeps_full_sequences_whatever_max_history(tmp_path):
    # 6 users x 6 movies (everyone rated everything): survives a 5-core; --max-history is only recorded
    ratings = ["userId,movieId,rating,timestamp"] + [f"{u},{m},4.0,{m if m != 3 else 2}"
                                                      for u in range(1, 7) for m in (1, 2, 3, 10, 7, 8)]
    movies = MOVIES + ["7,Seven,Drama", "8,Eight,(no genres listed)"]
    out = run_prepare(PrepareConfig(input=str(write_ml(tmp_path / "ml", ratings, movies)),
                                    out=str(tmp_path / "ds"), k_core=5, max_history=2))
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"], stats["max_history"]) == (6, 6, 36, 2)
    items = pq.read_table(out / "items.parquet").to_pylist()
    raw_ids = [r["raw_id"] for r in items]
    seq = pq.read_table(out / "sequences.parquet").column("items").to_pylist()[0]
    assert [raw_ids[i] for i in seq] == ["1", "2", "3", "7", "8", "10"]  # 2 and 3 tie at t=2: file order
    test = pq.read_table(out / "test.parquet").to_pylist()[0]
    assert len(test["history"]) == 5  # not cut to max_history: that happens at batching


@pytest.mark.skipif(not (REAL / "ratings.csv").is_file(), reason=f"{REAL} not present (research-licensed data)")
def test_real_movielens_small(tmp_path):
    t0 = time.time()
    out = run_prepare(PrepareConfig(input=str(REAL), out=str(tmp_path / "ds"), k_core=5, max_history=50))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["users_before_filter"] == 610 and stats["interactions_before_filter"] == 100836
    assert stats["users"] == 610
    assert 3000 <= stats["items"] <= 9724
    assert stats["max_seq_len"] > 50  # long histories are kept whole
    assert not list(Path(tmp_path).glob("ds/*.csv"))  # nothing of the raw data copied
    assert time.time() - t0 < 30
