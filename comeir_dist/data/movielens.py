"""Reader for the GroupLens MovieLens CSV layout ("ml-latest-small", "ml-latest", "ml-25m", ...).

A directory holding the original files, unchanged:

* ``ratings.csv``: ``userId,movieId,rating,timestamp`` (Unix seconds);
* ``movies.csv``: ``movieId,title,genres``, genres separated by ``|``; ``(no genres listed)`` means none.

What the reader makes of them (``read_movielens_dir`` returns the same ``RawData`` as the other readers):

* **Implicit feedback**: every rating is one interaction, whatever its value (0.5 and 5.0 alike); the
  ``rating`` column is not read. ``prepare`` then keeps a user's first rating of a movie, as for all inputs.
* **Time order**: ascending ``timestamp``. **Ties** (ratings of one user in the same second, about 16% of
  consecutive pairs in ml-latest-small) keep the order of the rows in ``ratings.csv``; GroupLens sorts that
  file by ``userId`` then ``movieId``, so tied ratings end up in ascending ``movieId`` order. The rule is
  stable and the same on every run (Arrow sort on (timestamp, row number), as for the table reader).
* **Item text**: ``title`` = the movie title as written (with its "(year)"), ``categories`` = the genres
  joined with ", " (the same text form as list-valued categories of other inputs), ``None`` for
  ``(no genres listed)`` or an empty field; ``description`` and ``brand`` are ``None`` (MovieLens has none).
* **IDs** are strings exactly as written (``userId``/``movieId`` are read as text).
* A rated movie absent from ``movies.csv`` is a one-line ``UserError`` naming the ``ratings.csv`` row.

Kept as plain functions (path -> ``RawData``) so conversion tools can use them without ``prepare``.
"""
from __future__ import annotations

from pathlib import Path

from comeir_dist.data.readers import (RawData, _add_item, _id_column, _item_fields, _read_table, _require_columns,
                                      _show, _time_order, _timestamp_column)
from comeir_dist.errors import UserError

RATINGS = "ratings.csv"
MOVIES = "movies.csv"
NO_GENRES = "(no genres listed)"


def is_movielens_dir(directory: Path) -> bool:
    """True for a directory in the MovieLens layout: it holds ``ratings.csv`` or ``movies.csv`` (the reader
    names the other one when it is missing) and no ``*.inter.json`` (that is the LC-Rec JSON layout)."""
    directory = Path(directory)
    if not directory.is_dir():
        return False
    has_ml = (directory / RATINGS).exists() or (directory / MOVIES).exists()
    return has_ml and not any(directory.glob("*.inter.json"))


def movielens_files(directory: Path) -> list[Path]:
    """The files the reader reads (for the input fingerprint of ``prepare``)."""
    return [Path(directory) / RATINGS, Path(directory) / MOVIES]


def genres_text(genres: str | None) -> str | None:
    """``'Adventure|Children'`` -> ``'Adventure, Children'``; ``'(no genres listed)'`` or empty -> ``None``."""
    if genres is None:
        return None
    parts = [g.strip() for g in genres.split("|")]
    parts = [g for g in parts if g and g != NO_GENRES]
    return ", ".join(parts) or None


def read_movies(path: Path) -> dict[str, dict[str, str | None]]:
    """``movies.csv`` -> {movieId: {title, description, brand, categories}}."""
    path = Path(path)
    table = _read_table(path, ("movieId", "title", "genres"))
    _require_columns(path, table, ("movieId", "title", "genres"))
    ids = _id_column(path, table, "movieId")
    titles = table.column("title").to_pylist()
    genres = table.column("genres").to_pylist()
    items: dict[str, dict[str, str | None]] = {}
    first: dict[str, str] = {}
    for n, key in enumerate(ids):
        where = f"row {n + 1} (movieId {_show(key)})"
        rec = {"title": titles[n], "description": None, "brand": None, "categories": genres_text(genres[n])}
        _add_item(path, items, first, key, f"row {n + 1}", _item_fields(path, where, rec))
    return items


def _rating_columns(path: Path):
    """(userId list, movieId list, timestamp column) of ``ratings.csv``; ids as written, timestamps checked."""
    table = _read_table(path, ("userId", "movieId"))
    _require_columns(path, table, ("userId", "movieId", "timestamp"))
    return _id_column(path, table, "userId"), _id_column(path, table, "movieId"), _timestamp_column(path, table)


def _sequences(users: list[str], movies: list[str], ts) -> dict[str, list[str]]:
    sequences: dict[str, list[str]] = {}
    for i in _time_order(ts):  # stable: (timestamp, row number), so ties keep the file's row order
        sequences.setdefault(users[i], []).append(movies[i])
    return sequences


def read_ratings(path: Path) -> dict[str, list[str]]:
    """``ratings.csv`` -> {userId: [movieId, ...]} in time order, ties in file order (every rating counts)."""
    return _sequences(*_rating_columns(Path(path)))


def read_movielens_dir(directory: Path) -> RawData:
    """A MovieLens directory (``ratings.csv`` + ``movies.csv``) -> ``RawData`` (see the module docstring)."""
    directory = Path(directory)
    ratings, movies_path = movielens_files(directory)
    for p in (ratings, movies_path):
        if not p.is_file():
            raise UserError(f"{p}: file not found (a MovieLens directory needs {RATINGS} and {MOVIES})")
    users, movies, ts = _rating_columns(ratings)
    items = read_movies(movies_path)
    missing_rows = [n for n, m in enumerate(movies) if m not in items]
    if missing_rows:
        n = missing_rows[0]
        distinct = len({movies[r] for r in missing_rows})
        raise UserError(f"{ratings}: row {n + 1}, column 'movieId': movie {_show(movies[n])} is absent from "
                        f"{movies_path} ({distinct} rated movie id(s) missing there in all)")
    return RawData(_sequences(users, movies, ts), items, source=str(directory))
