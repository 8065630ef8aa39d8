"""MovieLens native files (ml-100k ``u.data``/``u.item``, ml-1m ``ratings.dat``/``movies.dat``)
as one explicit ``movies`` domain. Item text = title + genres."""

from __future__ import annotations

import pathlib

from crossrec_jax.data.records import DataError, Interaction, Item

DOMAIN = "movies"
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _lines(path: pathlib.Path, encoding: str):
  if not path.is_file():
    raise DataError(f"{path}: file does not exist (is this a MovieLens ml-100k or ml-1m directory?)")
  text = path.read_bytes().decode(encoding)
  if not text.strip():
    raise DataError(f"{path}: file is empty")
  # Split on line ends only: str.splitlines() would also cut at U+0085, which is latin-1 b"\x85".
  return [(i, l.rstrip("\r")) for i, l in enumerate(text.split("\n"), 1) if l.strip()]


def _ratings(path, sep, encoding="latin-1"):
  out = []
  for n, line in _lines(path, encoding):
    parts = line.split(sep)
    if len(parts) != 4:
      raise DataError(f"{path}:line {n}: expected user{sep}item{sep}rating{sep}timestamp, got {line!r}")
    try:
      rating, ts = float(parts[2]), float(parts[3])
    except ValueError as e:
      raise DataError(f"{path}:line {n}: field rating/timestamp is not numeric: {line!r}") from e
    if not 1 <= rating <= 5:
      raise DataError(f"{path}:line {n}: field rating {rating:g} is outside MovieLens' 1-5 scale")
    out.append(Interaction(parts[0].strip(), DOMAIN, parts[1].strip(), rating, ts, None,
                           f"{path}:line {n}"))
  return out


def read_movielens(directory) -> tuple[list[Interaction], dict[tuple[str, str], Item]]:
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise DataError(f"{directory}: MovieLens directory does not exist")
  items: dict[tuple[str, str], Item] = {}
  if (directory / "u.data").exists():  # ml-100k
    interactions = _ratings(directory / "u.data", "\t")
    for n, line in _lines(directory / "u.item", "latin-1"):
      parts = line.split("|")
      if len(parts) != 5 + len(ML100K_GENRES):
        raise DataError(f"{directory / 'u.item'}:line {n}: expected {5 + len(ML100K_GENRES)} "
                        f"'|'-separated fields, got {len(parts)}")
      genres = [g for g, flag in zip(ML100K_GENRES, parts[5:]) if flag.strip() == "1"]
      items[(DOMAIN, parts[0])] = Item(parts[0], DOMAIN, f"{parts[1]}. {', '.join(genres)}",
                                       tuple(genres))
  elif (directory / "ratings.dat").exists():  # ml-1m
    interactions = _ratings(directory / "ratings.dat", "::")
    for n, line in _lines(directory / "movies.dat", "latin-1"):
      parts = line.split("::")
      if len(parts) != 3:
        raise DataError(f"{directory / 'movies.dat'}:line {n}: expected id::title::genres")
      items[(DOMAIN, parts[0])] = Item(parts[0], DOMAIN, f"{parts[1]}. {parts[2].replace('|', ', ')}",
                                       tuple(g for g in parts[2].split("|") if g))
  else:
    raise DataError(f"{directory}: neither u.data (ml-100k) nor ratings.dat (ml-1m) found")
  return interactions, items
