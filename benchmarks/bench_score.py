"""Bulk scoring throughput vs. the per-pair cross-encoder baseline, measured in the same run.

The bulk path (crossrec_jax.serving.end_to_end.EndToEndModel) encodes every distinct user and
item once and scores pairs from the cached vectors; the baseline ("seed approach") runs one BERT forward over the
concatenated user profile + item text for every pair. Both use the same encoder size, sequence
lengths, batch size and device.

python benchmarks/bench_score.py                       # MiniLM-L6 shape, CPU-sized defaults
python benchmarks/bench_score.py --bert base --users 20000 --items 20000 --pairs 2000000   # GPU
python benchmarks/bench_score.py --checkpoint RUN   # a trained end-to-end workdir
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crossrec_jax import cli
from crossrec_jax import config_defaults, sharding
from crossrec_jax.data import synthetic
from crossrec_jax.data.processing import ProcessingConfig, user_profile
from crossrec_jax.models import testing
from crossrec_jax.models import BertConfig, CrossDomainRecommender, DomainSpec, RecommenderConfig, hf
from crossrec_jax.serving.end_to_end import EndToEndModel
from crossrec_jax.serving.scorer import Scorer

BERTS = testing.BERT_SIZES


def _texts(num_users, num_items, seed=0):
  """Realistic profile and item texts from the synthetic generator (cycled to the sizes)."""
  interactions, items = synthetic.generate(synthetic.SyntheticConfig(num_users=200, seed=seed))
  tasks = {d: t for d, (t, _) in synthetic.DOMAINS.items()}
  by_user = {}
  for x in interactions:
    by_user.setdefault(x.user_id, []).append(x)
  profiles = [user_profile(h, items, tasks, ProcessingConfig(max_profile_items=8)) for h in by_user.values()]
  item_texts = [it.text for it in items.values()]
  users = [f"{profiles[i % len(profiles)]} #{i}" for i in range(num_users)]
  item_list = [f"{item_texts[i % len(item_texts)]} #{i}" for i in range(num_items)]
  return users, item_list


def _scorer(args, devices):
  if args.checkpoint:
    scorer = Scorer.from_checkpoint(args.checkpoint, batch_size=args.batch_size, devices=devices)
    if scorer.mode != "end_to_end":  # the bulk encoders timed here are the two-tower model's
      raise SystemExit(f"--checkpoint {args.checkpoint}: a {scorer.mode}-mode run; pass an end-to-end run")
    return scorer.model
  tokenizer = hf.load_tokenizer(hf.DEFAULT_CHECKPOINT) if not args.vocab_dir else hf.load_tokenizer(args.vocab_dir)
  bert = BertConfig(vocab_size=len(tokenizer), **BERTS[args.bert])
  domains = (DomainSpec("books", "rating", 1, 5), DomainSpec("movies", "rating", 1, 5),
             DomainSpec("music", "implicit"))
  config = config_defaults.base_config()
  # Text towers only (no hashed-ID tables), like the cross-encoder baseline.
  config.model.update(dict(dim=128, user_buckets=0, item_buckets=0, dtype=args.dtype))
  config.data.update(dict(user_max_length=args.user_len, item_max_length=args.item_len))
  model = CrossDomainRecommender(RecommenderConfig.from_config(config, bert=bert, domains=domains),
                                 rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  mesh = sharding.create_mesh({"data": -1}, devices)
  params = jax.device_put(nnx.to_pure_dict(params), sharding.replicated(mesh))
  return EndToEndModel(graphdef, params, model.config, config, tokenizer, mesh, batch_size=args.batch_size)


def _timed(fn, *a):
  fn(*a)  # compile / warm up on the same shapes
  t = time.perf_counter()
  out = fn(*a)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t


def cross_encoder_pairs_per_second(scorer: EndToEndModel, users, items, n_pairs, batch_size):
  """The seed approach: BERT over [CLS] profile [SEP] item [SEP] for each pair, then a head."""
  encoder = nnx.merge(scorer.graphdef, scorer.params).encoder
  g, p = nnx.split(encoder)
  head = jnp.ones((encoder.config.hidden_size,), jnp.float32) / encoder.config.hidden_size

  @jax.jit
  def forward(ids, mask, types):
    _, pooled = nnx.merge(g, p)(ids, mask, types)
    return pooled @ head

  length = scorer._max_length("user") + scorer._max_length("item")  # pylint: disable=protected-access
  enc = scorer.tokenizer([users[i % len(users)] for i in range(n_pairs)],
                         [items[(i * 7) % len(items)] for i in range(n_pairs)],
                         truncation="longest_first", max_length=length, padding="max_length",
                         return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  types = enc["token_type_ids"].astype(np.int32)
  forward(ids[:batch_size], mask[:batch_size], types[:batch_size]).block_until_ready()
  t = time.perf_counter()
  for start in range(0, n_pairs - batch_size + 1, batch_size):
    out = forward(ids[start:start + batch_size], mask[start:start + batch_size], types[start:start + batch_size])
  out.block_until_ready()
  done = (n_pairs // batch_size) * batch_size
  return done / (time.perf_counter() - t)


def _define_flags(fv, argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = dict(flag_values=fv)
  flags.DEFINE_string("checkpoint", "", "Training workdir (default: random weights).", **d)
  flags.DEFINE_enum("bert", "minilm", sorted(BERTS), "Encoder shape.", **d)
  flags.DEFINE_string("vocab_dir", "", "Tokenizer dir (default: the embedded MiniLM's).", **d)
  flags.DEFINE_string("dtype", "float32", "Compute dtype.", **d)
  flags.DEFINE_integer("users", 512, "Distinct users.", **d)
  flags.DEFINE_integer("items", 1024, "Distinct items.", **d)
  flags.DEFINE_integer("pairs", 50_000, "Pairs to score (bulk path).", **d)
  flags.DEFINE_integer("baseline_pairs", 256, "Pairs timed for the baseline.", **d)
  flags.DEFINE_integer("user_len", 64, "User text length.", **d)
  flags.DEFINE_integer("item_len", 24, "Item text length.", **d)
  flags.DEFINE_integer("batch_size", 64, "Encoder batch size.", **d)
  flags.DEFINE_integer("top_k", 10, "Top-K per user.", **d)


def main(args):
  devices = jax.devices()
  scorer = _scorer(args, devices)
  users, items = _texts(args.users, args.items)
  user_vecs, t_users = _timed(lambda: scorer.encode("user", users))
  item_vecs, t_items = _timed(lambda: scorer.encode("item", items))
  rng = np.random.default_rng(0)
  u_idx, i_idx = rng.integers(0, args.users, args.pairs), rng.integers(0, args.items, args.pairs)
  domains = rng.integers(0, len(scorer.model_config.domains), args.pairs)
  _, t_pairs = _timed(lambda: scorer.score_pairs(user_vecs[u_idx], item_vecs[i_idx], domains))
  _, t_topk = _timed(lambda: scorer.top_k(user_vecs, item_vecs, 2, args.top_k))
  bulk_total = t_users + t_items + t_pairs
  baseline_pps = cross_encoder_pairs_per_second(scorer, users, items, args.baseline_pairs, args.batch_size)
  baseline_total = args.pairs / baseline_pps
  result = {
      "device": str(devices[0].device_kind), "devices": len(devices), "bert": args.bert,
      "dtype": args.dtype, "users": args.users, "items": args.items, "pairs": args.pairs,
      "users_per_s": args.users / t_users, "items_per_s": args.items / t_items,
      "pairs_per_s_from_vectors": args.pairs / t_pairs,
      "top_k_users_per_s": args.users / t_topk,
      "bulk_pairs_per_s_end_to_end": args.pairs / bulk_total,
      "cross_encoder_pairs_per_s": baseline_pps,
      "bulk_seconds": bulk_total, "cross_encoder_seconds_estimated": baseline_total,
      "speedup": baseline_total / bulk_total,
  }
  print(f"device {result['device']} x{result['devices']}, BERT {args.bert} ({args.dtype}), "
        f"user_len {args.user_len}, item_len {args.item_len}, batch {args.batch_size}")
  print(f"bulk: {result['users_per_s']:.1f} users/s, {result['items_per_s']:.1f} items/s, "
        f"{result['pairs_per_s_from_vectors']:.0f} pairs/s from cached vectors, "
        f"top-{args.top_k} over {args.items} items: {result['top_k_users_per_s']:.1f} users/s")
  print(f"{args.pairs} pairs ({args.users} users x {args.items} items): bulk {bulk_total:.2f} s "
        f"({result['bulk_pairs_per_s_end_to_end']:.0f} pairs/s end to end)")
  print(f"cross-encoder baseline: {baseline_pps:.1f} pairs/s (timed on {args.baseline_pairs} pairs) "
        f"-> {baseline_total:.1f} s for the same pairs")
  print(f"speed ratio (baseline time / bulk time): {result['speedup']:.1f}x")
  print(json.dumps(result))


if __name__ == "__main__":
  sys.exit(cli.run_absl(sys.argv, _define_flags, main))  # exit codes: crossrec_jax/cli.py
