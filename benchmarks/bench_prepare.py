"""Prepare speed on generated bring-your-own data (default 300k interaction rows).

Reader: the pre-fix reader (``str.splitlines()`` + ``csv.DictReader`` + per-row checks; kept
below verbatim in substance as the baseline) against ``records.read_interactions`` (pyarrow
CSV + column-wise checks), same file, same process, rows/s and the ratio.
Prepare: read + process + write of the whole tfds data set, with tfds's generic example
serializer (what every prepare used before) and with ``fast_write``; rows/s and the ratio,
plus where the time goes. ``--old_src DIR`` also times a whole prepare of an older checkout
(e.g. ``git archive 477438d | tar -x -C DIR``) in a subprocess, and its prepare alone
(imports excluded) against ``fast_write``'s. Ratios are of CPU seconds
(user + system, all threads): on a shared machine wall time swings with the other load.

  python benchmarks/bench_prepare.py [--rows 300000] [--skip_prepare] [--old_src DIR]
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import random
import resource
import subprocess
import sys
import tempfile
import time

from crossrec_jax import cli
from crossrec_jax.data import builder, fast_write, records
from crossrec_jax.data.processing import ProcessingConfig


def generate(root: pathlib.Path, rows: int, seed: int = 0):
  rng = random.Random(seed)
  root.mkdir(parents=True, exist_ok=True)
  n_items, n_users = 2000, max(rows // 20, 1)
  with open(root / "items.csv", "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(["item_id", "domain", "title", "description"])
    for d in ("books", "movies"):
      for i in range(n_items):
        w.writerow([f"{d[0]}{i}", d, f"title {i}, vol. {i % 7}", f"some description words {i}"])
  with open(root / "interactions.csv", "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "domain", "item_id", "label", "timestamp"])
    for k in range(rows):
      d = rng.choice(("books", "movies"))
      w.writerow([f"u{rng.randrange(n_users)}", d, f"{d[0]}{rng.randrange(n_items)}",
                  rng.randint(1, 5), 1_600_000_000 + k])


def old_read_interactions(path: pathlib.Path) -> list:
  """The reader before issue 13: whole file -> str.splitlines() -> DictReader -> per-row checks."""
  text = path.read_text(encoding="utf-8")
  reader = csv.DictReader(text.splitlines())
  names = [n.strip() for n in (reader.fieldnames or [])]
  reader.fieldnames = names
  order_column = next((c for c in ("timestamp", "position") if c in names), None)
  out = []
  for n, row in enumerate(reader):
    place = f"{path}:line {reader.line_num}"
    if None in row:
      raise ValueError(f"{place}: more fields than the header's {len(names)}")
    ids = {c: str(row.get(c) or "").strip() for c in ("user_id", "domain", "item_id")}
    if not all(ids.values()):
      raise ValueError(f"{place}: empty id")
    label = float(row.get("label"))
    if not math.isfinite(label):
      raise ValueError(f"{place}: label")
    order = float(row.get(order_column)) if order_column else float(n)
    split = str(row.get("split") or "").strip() or None
    out.append(records.Interaction(ids["user_id"], ids["domain"], ids["item_id"], label, order,
                                   split, place))
  return out


class _Clock:
  """Wall and CPU seconds (this process and its threads, plus waited-for children)."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), _cpu()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
  own, children = os.times(), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.user + own.system + children.ru_utime + children.ru_stime


def _megabytes(directory: pathlib.Path) -> str:
  """Size of the array_record shards under ``directory`` (compression changes it)."""
  size = sum(p.stat().st_size for p in directory.rglob("*.array_record*"))
  return f"{size / 1e6:.1f} MB of records"


def _best(fn, repeats: int):
  best, result = None, None
  for _ in range(repeats):
    with _Clock() as clock:
      result = fn()
    if best is None or clock.cpu < best.cpu:
      best = clock
  return best, result


def bench_reader(root: pathlib.Path, repeats: int):
  path = root / "interactions.csv"
  old_c, old = _best(lambda: old_read_interactions(path), repeats)
  new_c, new = _best(lambda: records.read_interactions(path), repeats)
  assert len(old) == len(new) and old[-1].item_id == new[-1].item_id
  n = len(new)
  print(f"reader   old {old_c.cpu:6.2f} cpu s {n / old_c.cpu:10,.0f} rows/cpu s (wall {old_c.wall:.2f} s)"
        f" | new {new_c.cpu:6.2f} cpu s {n / new_c.cpu:10,.0f} rows/cpu s (wall {new_c.wall:.2f} s)"
        f" | ratio {old_c.cpu / new_c.cpu:.1f}x", flush=True)
  return n, old_c, new_c


def bench_prepare(root: pathlib.Path, rows: int, data_dir: pathlib.Path):
  processing = ProcessingConfig(link_secret="bench")
  totals, stages = {}, {}
  serializer, load_and_process = fast_write.serializer, builder.load_and_process

  def timed_load_and_process(config):  # read + validate + build examples, inside prepare
    with _Clock() as clock:
      out = load_and_process(config)
    stages["load_and_process"] = clock
    return out
  for name, choice in (("tfds serializer", lambda *a: None), ("fast_write", serializer)):
    fast_write.serializer, builder.load_and_process = choice, timed_load_and_process
    try:
      with _Clock() as clock:
        builder.prepare("byo", str(root), data_dir=str(data_dir / name.replace(" ", "_")),
                        processing=processing)
    finally:
      fast_write.serializer, builder.load_and_process = serializer, load_and_process
    totals[name] = clock
    load = stages["load_and_process"]
    print(f"prepare  {name:16s} {clock.cpu:7.1f} cpu s {rows / clock.cpu:9,.0f} rows/cpu s "
          f"(wall {clock.wall:.1f} s; read + process {load.cpu:.1f} cpu s, write "
          f"{clock.cpu - load.cpu:.1f} cpu s; {_megabytes(data_dir / name.replace(' ', '_'))})",
          flush=True)
  ratio = totals["tfds serializer"].cpu / totals["fast_write"].cpu
  print(f"prepare  ratio {ratio:.1f}x (CPU seconds)", flush=True)
  return totals


def bench_old_checkout(root: pathlib.Path, rows: int, old_src: str, data_dir: pathlib.Path,
                       ours: _Clock | None = None):
  # The child also times prepare alone (CPU of all its threads), without its imports.
  code = ("import time; from crossrec_jax.data import builder; t = time.process_time(); "
          f"builder.prepare('byo', {str(root)!r}, data_dir={str(data_dir / 'old_checkout')!r}); "
          "print('prepare cpu', time.process_time() - t)")
  env = dict(os.environ, PYTHONPATH=old_src)
  with _Clock() as clock:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=old_src).stdout
  prepare_cpu = float(out.rsplit("prepare cpu", 1)[1].split()[0])
  print(f"prepare  old checkout     {clock.cpu:7.1f} cpu s {rows / clock.cpu:9,.0f} rows/cpu s "
        f"(wall {clock.wall:.1f} s; {old_src}; includes its interpreter start and imports; "
        f"prepare alone {prepare_cpu:.1f} cpu s; {_megabytes(data_dir / 'old_checkout')})",
        flush=True)
  if ours is not None:
    print(f"prepare  old checkout / fast_write: {prepare_cpu / ours.cpu:.1f}x (CPU seconds of "
          "prepare alone, imports excluded on both sides)", flush=True)
  return clock


def _define_flags(fv, argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = dict(flag_values=fv)
  flags.DEFINE_integer("rows", 300_000, "Interaction rows generated.", **d)
  flags.DEFINE_integer("repeats", 2, "Timings of each reader (the best is kept).", **d)
  flags.DEFINE_bool("skip_prepare", False, "Time the readers only.", **d)
  flags.DEFINE_string("old_src", "", "An older checkout to time a whole prepare of.", **d)


def main(args):
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "byo"
    generate(root, args.rows)
    print(f"{args.rows:,} interaction rows, {(root / 'interactions.csv').stat().st_size / 1e6:.1f} MB")
    bench_reader(root, args.repeats)
    totals = {} if args.skip_prepare else bench_prepare(root, args.rows, pathlib.Path(tmp) / "tfds")
    if args.old_src:
      bench_old_checkout(root, args.rows, args.old_src, pathlib.Path(tmp) / "tfds",
                         totals.get("fast_write"))


if __name__ == "__main__":
  sys.exit(cli.run_absl(sys.argv, _define_flags, main))  # exit codes: crossrec_jax/cli.py
