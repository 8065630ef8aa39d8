"""Serving any run through one ``Scorer``: the encoder mode read from the checkpoint, new items
scored from their text with no retraining, and one streamed top-K kernel."""

import csv
import dataclasses
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from crossrec_jax import ranking
from crossrec_jax.data import SyntheticConfig, records, synthetic
from crossrec_jax.errors import ScoringError
from crossrec_jax.serving.scorer import Scorer, encoder_mode


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
  """(workdir, config, exported inputs) of one tiny frozen-mode run (the demo's kind of run)."""
  from crossrec_jax import train  # pylint: disable=import-outside-toplevel
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("frozen_serving")
  config = load_config("tiny", **{"encoder_mode": "frozen", "data.data_dir": str(root / "tfds"),
                                  "data.synthetic_users": 200, "data.items_per_domain": 40,
                                  "hybrid.epochs": 30, "train_steps": 0})
  train.train_and_evaluate(config, root / "run")
  return root / "run", config, _inputs(config, root / "inputs")


def _inputs(config, directory):
  return synthetic.export(directory, SyntheticConfig(
      num_users=config.data.synthetic_users, items_per_domain=config.data.items_per_domain,
      seed=config.seed))


@pytest.fixture(scope="module")
def frozen(frozen_run):
  workdir, _, files = frozen_run
  return (Scorer.from_checkpoint(workdir), records.read_items(files / "items.csv"),
          _by_user(records.read_interactions(files / "interactions.csv")))


def _by_user(history):
  out = {}
  for x in history:
    out.setdefault(x.user_id, []).append(x)
  return out


def _ranking(scorer, history, items, domain):
  """(item ids, scores) of the user's whole unseen catalog of ``domain``, best first."""
  top = next(iter(scorer.recommend(history, items, len(items), domains=[domain])))
  return top["item_id"], top["score"]


def test_streamed_top_k_is_the_brute_force_top_k_across_blocks():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(11, 50)).astype(np.float32)
  scores[3, 10:20] = 0.5                      # ties: the lower index first, as a stable sort
  exclude = np.full((11, 8), -1, np.int32)
  for u in range(11):
    cols = rng.choice(50, size=rng.integers(0, 8), replace=False)
    exclude[u, :len(cols)] = cols             # excluded columns fall in every block
  for block in (7, 16, 50, 4096):             # uneven blocks, one block, a block past the catalog
    for as_device in (False, True):
      source = jnp.asarray(scores) if as_device else scores
      top, index = ranking.streamed_top_k(lambda a, b: source[:, a:b], 50, exclude, k=9,
                                          block=block)
      for u in range(11):
        row = scores[u].copy()
        row[exclude[u][exclude[u] >= 0]] = -np.inf
        expected = np.argsort(-row, kind="stable")[:9]
        np.testing.assert_array_equal(index[u], expected, err_msg=f"block {block} row {u}")
        np.testing.assert_allclose(top[u], row[expected], rtol=1e-6)
  # Fewer candidates than k: the missing places are index -1, score -inf.
  top, index = ranking.streamed_top_k(lambda a, b: scores[:2, a:b], 5,
                                      np.array([[0, 1, -1], [-1, -1, -1]], np.int32), k=4, block=2)
  assert list(index[0]) == list(np.argsort(-scores[0, 2:5], kind="stable") + 2) + [-1]
  assert top[0, -1] == -np.inf and (index[1] >= 0).all()


def test_from_checkpoint_reads_the_mode_and_loads_a_frozen_and_an_end_to_end_run(
    frozen_run, frozen, tiny_run, tmp_path):
  from crossrec_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  scorer, items, by_user = frozen
  end_to_end = Scorer.from_checkpoint(tiny_run[0])
  for s, workdir, mode in ((scorer, frozen_run[0], "frozen"),
                           (end_to_end, tiny_run[0], "end_to_end")):
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
      newest = checkpointer.all_steps()[-1]
      meta = checkpointer.read_meta(newest)
    finally:
      checkpointer.close()
    assert encoder_mode(workdir, meta) == mode == s.mode and s.step == newest
  # One interface: the same request gives a top-K table from either run.
  e2e_files = _inputs(tiny_run[1], tmp_path / "e2e")
  e2e_items = records.read_items(e2e_files / "items.csv")
  e2e_users = _by_user(records.read_interactions(e2e_files / "interactions.csv"))
  for s, its, users in ((scorer, items, by_user), (end_to_end, e2e_items, e2e_users)):
    user = sorted(users)[0]
    rows = [r for chunk in s.recommend(users[user], its, 3) for r in zip(*chunk.values())]
    assert len(rows) == 3 * len(s.domains), (s.mode, rows)
    seen = {(x.domain, x.item_id) for x in users[user]}
    assert not [r for r in rows if (r[1], r[3]) in seen], "recommended the user's own items"
  # --step: a frozen run serves the model its evaluation served, the newest.
  with pytest.raises(ScoringError, match=f"no step {scorer.step + 1}; available"):
    Scorer.from_checkpoint(frozen_run[0], step=scorer.step + 1)
  older = sorted(int(p.name) for p in (frozen_run[0] / "checkpoints").iterdir()
                 if p.name.isdigit() and int(p.name) < scorer.step)
  if older:
    with pytest.raises(ScoringError, match="serves its final model"):
      Scorer.from_checkpoint(frozen_run[0], step=older[0])


def test_a_new_item_is_scored_from_its_text_and_ranks_next_to_its_original(frozen):
  """A copy of the user's favourite unseen item (the top of their ranking), under a new ID:
  scored with no retraining, it must rank in the user's top 3 on the rating domain and in the
  top quarter of the fused implicit domain's candidates, next to the original; its pair score
  is the score it has in the top-K."""
  scorer, items, by_user = frozen
  for domain, near in (("books", 3), ("music", None)):
    for user in sorted(by_user)[:6]:
      history = by_user[user]
      ids, _ = _ranking(scorer, history, items, domain)
      original = ids[0]
      extended = dict(items) | {(domain, "zz-copy"): dataclasses.replace(
          items[(domain, original)], item_id="zz-copy")}
      ids, scores = _ranking(scorer, history, extended, domain)
      assert len(ids) == len(set(ids)) and "zz-copy" in ids, (domain, user)
      rank, original_rank = ids.index("zz-copy") + 1, ids.index(original) + 1
      limit = near or max(3, len(ids) // 4)
      assert rank <= limit and abs(rank - original_rank) < limit, (domain, user, rank, original_rank, len(ids))
      pairs = next(iter(scorer.score(history, extended, [(user, "zz-copy", domain)])))
      expected = np.clip(scores[rank - 1], 1, 5) if domain == "books" else scores[rank - 1]
      np.testing.assert_allclose(pairs["score"][0], expected, rtol=1e-5, atol=1e-5)


def test_a_new_item_is_the_network_s_text_item_with_no_id_factor_and_the_catalog_keeps_its_scores(frozen):
  """The network scores a text copy of catalog item X as X minus its ID factor and bias, and
  text-kNN finds X as its nearest neighbour; the catalog's fused scores are the evaluation's."""
  scorer, items, by_user = frozen
  model = scorer.model
  user = sorted(by_user)[0]
  people = scorer.link(by_user[user])
  batch = [(model.queries.user_of(people.key(p)), people.histories[p]) for p in people.histories]
  for domain in ("books", "music"):
    d = model.domains.index(domain)
    ids = model.data.item_ids[d]
    copies = {(domain, f"zz-{i}"): dataclasses.replace(items[(domain, i)], item_id=f"zz-{i}")
              for i in ids[:5]}
    new = model.new_items(sorted(copies), copies)
    q = model.queries(batch, d)
    full = model.fused_rows(q, d, new)
    np.testing.assert_array_equal(full[:, :len(ids)], model.model.score_catalog(q, d))
    hybrid = model.model.hybrid
    users, _ = hybrid.user_vectors(q)
    lo = int(model.data.offsets[d])
    net = hybrid.model
    catalog = hybrid.score_catalog(q, d)
    order = [ids.index(i[3:]) for i in new.ids[d]]
    id_part = (np.asarray(users) @ np.asarray(net.item_factors.value[lo:lo + len(ids)]).T
               + np.asarray(net.item_bias.value[lo:lo + len(ids)]))
    if domain == "books":   # not fused: the network's own score
      np.testing.assert_allclose(full[:, len(ids):], (catalog - id_part)[:, order], atol=1e-4)
    knn = new.text_knn[d].toarray()
    assert list(knn.argmax(0)) == [lo + j for j in order]
    np.testing.assert_allclose(knn.max(0), 1.0, atol=1e-4)


def test_cli_scores_new_items_of_a_frozen_run(frozen_run, tmp_path):
  workdir, _, files = frozen_run
  items = tmp_path / "items.csv"
  items.write_text((files / "items.csv").read_text() +
                   "zz-new,music,the quiet jazz of the blue night. genre: jazz album\n")
  out = subprocess.run([sys.executable, "-m", "crossrec_jax.score", f"--checkpoint={workdir}",
                        f"--users={files / 'interactions.csv'}", f"--items={items}",
                        f"--output={tmp_path / 'top.csv'}", "--top_k=40", "--domains=music"],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "(frozen encoder mode)" in out.stderr
  counts = json.loads(out.stdout.strip().splitlines()[-1])
  assert counts["encoder_mode"] == "frozen" and counts["rows"] > 0
  with open(tmp_path / "top.csv") as f:
    top = list(csv.DictReader(f))
  assert {r["domain"] for r in top} == {"music"}
  assert "zz-new" in {r["item_id"] for r in top}
  ranked = {}
  for r in top:
    ranked.setdefault(r["user_id"], []).append(r["item_id"])
  assert all(len(v) == len(set(v)) for v in ranked.values())
