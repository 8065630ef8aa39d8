"""Synthetic cross-domain data (the embedded default: no download).

Users have a hidden taste over shared genres. Books and movies are explicit (ratings 1-5),
music is implicit (listens). A user's rating / choice in every domain follows the same taste,
so history in one domain predicts the others, and item texts carry the genre words a text
encoder can pick up. Deterministic given the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from crossrec_jax.data.records import Interaction, Item

GENRES = {
    "science fiction": (["space", "robot", "galaxy", "star", "planet", "alien"],
                        ["voyage", "signal", "colony", "machine", "orbit"]),
    "romance": (["love", "heart", "summer", "kiss", "wedding", "rose"],
                ["letters", "promise", "dance", "garden", "season"]),
    "mystery": (["murder", "secret", "shadow", "detective", "clue", "silent"],
                ["case", "witness", "manor", "alibi", "puzzle"]),
    "history": (["empire", "king", "war", "ancient", "revolution", "queen"],
                ["chronicle", "dynasty", "battle", "kingdom", "century"]),
    "comedy": (["funny", "crazy", "silly", "party", "laugh", "wild"],
               ["weekend", "roommates", "wedding", "road", "trip"]),
    "horror": (["haunted", "blood", "ghost", "night", "dead", "curse"],
               ["house", "asylum", "forest", "ritual", "whispers"]),
}
# Bumped whenever the generator's output changes, so cached prepared data sets are rebuilt.
GENERATOR_VERSION = 3

DOMAINS = {  # name -> (task, noun shown in the text)
    "books": ("rating", "novel"),
    "movies": ("rating", "film"),
    "music": ("implicit", "album"),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_users: int = 400
  items_per_domain: int = 120
  interactions_per_domain: tuple[int, int] = (4, 10)  # per user, inclusive range
  cold_fraction: float = 0.2   # users with a single interaction in one domain (cold there)
  seed: int = 0

  @classmethod
  def from_config(cls, config) -> "SyntheticConfig":
    """The generated data of a run with ``config.data.source = "synthetic"``."""
    return cls(num_users=config.data.synthetic_users,
               items_per_domain=config.data.items_per_domain, seed=config.seed)


def vocabulary_words() -> list[str]:
  words = {w for g, (a, b) in GENRES.items() for w in (*g.split(), *a, *b)}
  words |= {noun for _, noun in DOMAINS.values()} | set(DOMAINS) | {"genre", "rated"}
  return sorted(words)


def generate(config: SyntheticConfig = SyntheticConfig()):
  """Returns (interactions, items) in the bring-your-own record types."""
  rng = np.random.default_rng(config.seed)
  genres = list(GENRES)
  items: dict[tuple[str, str], Item] = {}
  item_genre, item_quality, catalog = {}, {}, {}
  for domain, (_, noun) in DOMAINS.items():
    catalog[domain], titles = [], set()
    for i in range(config.items_per_domain):
      g = int(rng.integers(len(genres)))
      adjectives, nouns = GENRES[genres[g]]
      title = None
      while title is None or title in titles:  # titles are unique within a domain
        title = f"the {rng.choice(adjectives)} {rng.choice(nouns)}"
        if rng.random() < 0.5:
          title += f" of the {rng.choice(adjectives)} {rng.choice(nouns)}"
      titles.add(title)
      item_id = f"{domain[:2]}{i:04d}"
      items[(domain, item_id)] = Item(item_id, domain, f"{title}. genre: {genres[g]} {noun}")
      item_genre[(domain, item_id)] = g
      item_quality[(domain, item_id)] = rng.normal(0.0, 0.3)
      catalog[domain].append(item_id)

  interactions: list[Interaction] = []
  lo, hi = config.interactions_per_domain
  for u in range(config.num_users):
    # Two favourite genres, one disliked: shared by every domain.
    taste = rng.normal(0.0, 0.3, len(genres))
    favourite, second, disliked = rng.choice(len(genres), 3, replace=False)
    taste[favourite] += 2.0
    taste[second] += 1.0
    taste[disliked] -= 1.5
    cold_domain = rng.choice(list(DOMAINS)) if rng.random() < config.cold_fraction else None
    events = []
    for domain, (task, _) in DOMAINS.items():
      ids = catalog[domain]
      affinity = np.array([taste[item_genre[(domain, i)]] for i in ids])
      # Choice follows taste (what people pick), plus popularity through quality.
      quality = np.array([item_quality[(domain, i)] for i in ids])
      p = np.exp(1.2 * affinity + quality)
      n = 1 if domain == cold_domain else int(rng.integers(lo, hi + 1))
      chosen = rng.choice(len(ids), size=n, replace=False, p=p / p.sum())
      for c in chosen:
        if task == "rating":
          score = 3.0 + 0.9 * affinity[c] + quality[c] + rng.normal(0.0, 0.4)
          label = float(np.clip(np.round(score), 1, 5))
        else:
          label = 1.0
        events.append((domain, ids[c], label))
    order = list(rng.permutation(len(events)))
    if cold_domain is not None:  # a user who joins a new platform: its one event comes last
      last = next(i for i, e in enumerate(events) if e[0] == cold_domain)
      order.remove(last)
      order.append(last)
    for position, e in enumerate(order):
      domain, item_id, label = events[e]
      interactions.append(Interaction(f"user{u:05d}", domain, item_id, label, float(position),
                                      None, f"synthetic:user{u:05d}:{position}"))
  return interactions, items


def export(output_dir, config: SyntheticConfig = SyntheticConfig(), pairs_per_user: int = 3):
  """Writes the data set in the bring-your-own layout (interactions.csv, items.csv) plus a
  pairs.csv sample, e.g. as inputs for ``python -m crossrec_jax.score``."""
  import csv  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  interactions, items = generate(config)
  with open(out / "items.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["item_id", "domain", "title"])
    w.writerows([i, d, it.text] for (d, i), it in sorted(items.items()))
  with open(out / "interactions.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "domain", "item_id", "label", "position"])
    w.writerows([x.user_id, x.domain, x.item_id, f"{x.label:g}", int(x.order)] for x in interactions)
  rng = np.random.default_rng(config.seed + 1)
  keys = sorted(items)
  users = sorted({x.user_id for x in interactions})
  with open(out / "pairs.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "item_id", "domain"])
    for u in users:
      for k in rng.choice(len(keys), pairs_per_user, replace=False):
        w.writerow([u, keys[k][1], keys[k][0]])
  return out


def _define_flags(fv, argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = dict(flag_values=fv)
  flags.DEFINE_string("output_dir", None, "Where interactions.csv, items.csv, pairs.csv go.", **d)
  flags.DEFINE_integer("num_users", SyntheticConfig.num_users, "Users.", **d)
  flags.DEFINE_integer("items_per_domain", SyntheticConfig.items_per_domain, "Items per domain.", **d)
  flags.DEFINE_integer("seed", 0, "Seed.", **d)
  flags.mark_flags_as_required(["output_dir"], flag_values=fv)


def _main(f) -> int:
  path = export(f.output_dir, SyntheticConfig(num_users=f.num_users,
                                              items_per_domain=f.items_per_domain, seed=f.seed))
  print(f"wrote {path}/interactions.csv, items.csv, pairs.csv")
  return 0


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel
  from crossrec_jax import cli  # pylint: disable=import-outside-toplevel
  sys.exit(cli.run_absl(sys.argv, _define_flags, _main))  # exit codes: crossrec_jax/cli.py
