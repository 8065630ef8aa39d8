"""A synthetic bring-your-own data folder at any size, for the scale checks.

python benchmarks/synthetic_byo.py --out /tmp/byo --items 30000 --users 20000 --interactions 300000

Writes ``interactions.csv`` and ``items.csv`` in the layout ``data.source = "byo"`` reads (the
layout of ../shared/data/amazon-arts-office): two implicit (or, ``--explicit``, rating) domains, ``shop`` (``--items``
items) and ``books`` (a tenth of that), item popularity following a power law (Zipf exponent
``--zipf``), each user's items drawn around a hidden taste over topics that the item titles
name, so both CF and the text see a signal. Interactions are ordered per user (``position``);
the split column is empty, so the reader splits (``data.split``). Deterministic given ``--seed``.
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import numpy as np

TOPICS = ["garden", "kitchen", "travel", "office", "music", "sport", "art", "science", "toys",
          "beauty", "tools", "pets", "books", "games", "health", "baby"]
WORDS = ["classic", "compact", "deluxe", "portable", "premium", "mini", "pro", "eco", "smart",
         "vintage", "modern", "large", "soft", "bright", "quiet", "fast"]


def write(out: pathlib.Path, items: int, users: int, interactions: int, *, zipf: float = 1.0,
          seed: int = 0, text: bool = True, explicit: bool = False,
          user_sigma: float = 0.0) -> dict[str, int]:
  """Writes the folder; returns its counts per domain and in all. ``explicit``: ratings 1-5
  (the user's taste for the item's topic, plus noise) instead of implicit interactions;
  ``user_sigma`` > 0: user activity log-normal with that sigma (a heavy tail of very active
  users) instead of Poisson."""
  rng = np.random.default_rng(seed)
  out.mkdir(parents=True, exist_ok=True)
  domains = {"shop": items, "books": max(items // 10, 10)}
  catalog = {}
  with open(out / "items.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["item_id", "domain", "title", "attributes"] if text else ["item_id", "domain"])
    for name, n in domains.items():
      topic = rng.integers(len(TOPICS), size=n)
      popularity = 1.0 / np.arange(1, n + 1) ** zipf  # rank r has weight r^-zipf
      catalog[name] = (topic, popularity[rng.permutation(n)])
      for i in range(n):
        row = [f"{name[0]}{i}", name]
        if text:
          words = rng.choice(WORDS, 2, replace=False)
          row += [f"{words[0]} {TOPICS[topic[i]]} {name} item {words[1]}",
                  f"{TOPICS[topic[i]]} {name}"]
        w.writerow(row)
  if user_sigma > 0:
    raw = rng.lognormal(0.0, user_sigma, users)
    per_user = np.maximum(1, np.round(raw * interactions / raw.sum())).astype(int)
  else:
    per_user = np.maximum(1, rng.poisson(interactions / users, users))
  total = {name: 0 for name in domains}
  with open(out / "interactions.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "domain", "item_id", "label", "position", "split"])
    for u in range(users):
      taste = rng.dirichlet(np.full(len(TOPICS), 0.3))
      count = int(per_user[u])
      picks = rng.random(count) < 0.8  # 80% of a user's items from the big domain
      seen, position = set(), 0
      for k in range(count):
        name = "shop" if picks[k] else "books"
        topic, popularity = catalog[name]
        # A few candidates by popularity; the user takes the one their taste likes best.
        candidates = rng.choice(len(topic), 8, p=popularity / popularity.sum())
        item = candidates[np.argmax(taste[topic[candidates]] + 0.05 * rng.random(8))]
        if (name, item) in seen:  # one row per (user, item): a repeat is skipped
          continue
        seen.add((name, item))
        label = 1
        if explicit:  # taste (a probability over topics) mapped to 1..5, with noise
          score = 1 + 4 * min(1.0, taste[topic[item]] * len(TOPICS) / 4) + rng.normal(0, 0.7)
          label = int(np.clip(np.round(score), 1, 5))
        w.writerow([f"u{u}", name, f"{name[0]}{item}", label, position, ""])
        total[name] += 1
        position += 1
  return {**{f"items_{k}": v for k, v in domains.items()}, **total, "users": users}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--items", type=int, default=30_000)
  parser.add_argument("--users", type=int, default=20_000)
  parser.add_argument("--interactions", type=int, default=300_000)
  parser.add_argument("--zipf", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_text", action="store_true")
  parser.add_argument("--explicit", action="store_true", help="ratings 1-5 instead of implicit")
  parser.add_argument("--user_sigma", type=float, default=0.0,
                      help="> 0: log-normal user activity (a heavy tail)")
  args = parser.parse_args()
  print(write(args.out, args.items, args.users, args.interactions, zipf=args.zipf,
              seed=args.seed, text=not args.no_text, explicit=args.explicit,
              user_sigma=args.user_sigma))


if __name__ == "__main__":
  main()
