"""MovieLens native files (ml-100k ``u.data``/``u.item``/``u.user``, ml-1m ``ratings.dat``/
``movies.dat``/``users.dat``) as one explicit ``movies`` domain. Item text = title + genres (also
item tags); the users' demographics (age band, gender, occupation, first zip digit) are user tags."""

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


def _age_band(age: str) -> str:
  a = int(age)  # the ml-1m bands, applied to ml-100k's exact ages too
  for upper, band in ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
                      (56, "50-55")):
    if a < upper:
      return band
  return "56+"


def _user_tags(path: pathlib.Path, sep: str, fields: tuple[int, int, int, int]):
  """user id -> tags; an absent users file means no demographics (it is optional)."""
  if not path.is_file():
    return {}
  age, gender, occupation, zipcode = fields
  out = {}
  for n, line in _lines(path, "latin-1"):
    parts = line.split(sep)
    try:
      out[parts[0].strip()] = (f"age:{_age_band(parts[age])}", f"gender:{parts[gender].strip()}",
                               f"occupation:{parts[occupation].strip()}",
                               f"zip:{parts[zipcode].strip()[:1]}")
    except (IndexError, ValueError) as e:
      raise DataError(f"{path}:line {n}: expected user{sep}age{sep}gender{sep}occupation{sep}zip "
                      f"fields, got {line!r}") from e
  return out


def _with_user_tags(interactions, tags):
  for x in interactions:
    x.user_tags = tags.get(x.user_id, ())
  return interactions


def read_movielens(directory) -> tuple[list[Interaction], dict[tuple[str, str], Item]]:
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise DataError(f"{directory}: MovieLens directory does not exist")
  items: dict[tuple[str, str], Item] = {}
  if (directory / "u.data").exists():  # ml-100k
    interactions = _with_user_tags(_ratings(directory / "u.data", "\t"),
                                   _user_tags(directory / "u.user", "|", (1, 2, 3, 4)))
    for n, line in _lines(directory / "u.item", "latin-1"):
      parts = line.split("|")
      if len(parts) != 5 + len(ML100K_GENRES):
        raise DataError(f"{directory / 'u.item'}:line {n}: expected {5 + len(ML100K_GENRES)} "
                        f"'|'-separated fields, got {len(parts)}")
      genres = [g for g, flag in zip(ML100K_GENRES, parts[5:]) if flag.strip() == "1"]
      items[(DOMAIN, parts[0])] = Item(parts[0], DOMAIN, f"{parts[1]}. {', '.join(genres)}",
                                       tuple(genres))
  elif (directory / "ratings.dat").exists():  # ml-1m
    interactions = _with_user_tags(_ratings(directory / "ratings.dat", "::"),
                                   _user_tags(directory / "users.dat", "::", (2, 1, 3, 4)))
    for n, line in _lines(directory / "movies.dat", "latin-1"):
      parts = line.split("::")
      if len(parts) != 3:
        raise DataError(f"{directory / 'movies.dat'}:line {n}: expected id::title::genres")
      items[(DOMAIN, parts[0])] = Item(parts[0], DOMAIN, f"{parts[1]}. {parts[2].replace('|', ', ')}",
                                       tuple(g for g in parts[2].split("|") if g))
  else:
    raise DataError(f"{directory}: neither u.data (ml-100k) nor ratings.dat (ml-1m) found")
  return interactions, items
