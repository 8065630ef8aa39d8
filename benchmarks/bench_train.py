"""Train-step throughput: our jitted, sharded step (plain and with each adversarial method) vs.
the seed approach (transformers' PyTorch BertForSequenceClassification + AdamW, AMP on GPU),
same device, encoder size, batch and tokens, measured in the same run.

python benchmarks/bench_train.py                          # MiniLM-L6 shape, seq 64 and 128, CPU
python benchmarks/bench_train.py --bert base --seq 128 --batch 64 --dtype bfloat16   # GPU / TPU

Our model reads a user profile (user_len tokens) and an item text (item_len tokens) per
example; the baseline cross-encoder reads both concatenated (user_len + item_len tokens).
MFU counts model FLOPs of one forward + backward (6 * params * tokens + attention), so extra
adversarial passes lower it by design.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from crossrec_jax import cli
from crossrec_jax import config_defaults, sharding
from crossrec_jax.training import adversarial
from crossrec_jax.training import steps
from crossrec_jax.models import testing
from crossrec_jax.models import BertConfig, CrossDomainRecommender, DomainSpec, RecommenderConfig
from crossrec_jax.training import optim

BERTS = testing.BERT_SIZES
# Dense bf16 peak FLOP/s per chip / GPU (vendor figures).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
              "Tesla V100": 125e12}


def peak_flops(device) -> float | None:
  kind = device.device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k) or k in kind), None)


def model_flops_per_example(bert: BertConfig, lengths) -> float:
  """Forward + backward (3x forward) FLOPs of the encoder over the given sequence lengths."""
  h, L, m = bert.hidden_size, bert.num_hidden_layers, bert.intermediate_size
  per_token = L * (2 * (4 * h * h + 2 * h * m))             # dense layers, 2 FLOPs per MAC
  total = 0.0
  for t in lengths:
    total += per_token * t + L * 2 * 2 * t * t * h           # + QK^T and PV
  return 3.0 * total


def _batch(rng, b, user_len, item_len, vocab, num_domains=3):
  mask = lambda t: np.ones((b, t), np.int32)
  return {"user_input_ids": rng.integers(1000, vocab, (b, user_len)).astype(np.int32),
          "user_attention_mask": mask(user_len),
          "item_input_ids": rng.integers(1000, vocab, (b, item_len)).astype(np.int32),
          "item_attention_mask": mask(item_len),
          "user_bucket": rng.integers(0, 1024, b).astype(np.int32),
          "item_bucket": rng.integers(0, 1024, b).astype(np.int32),
          "domain": (np.arange(b) % num_domains).astype(np.int32),
          "label": np.where(np.arange(b) % num_domains == 2, 1.0, rng.integers(1, 6, b)).astype(np.float32),
          "weight": np.ones(b, np.float32), "cold": np.zeros(b, np.int32),
          "item_row": np.arange(b, dtype=np.int32), "item_log_q": np.full(b, -5.0, np.float32)}


def jax_examples_per_second(args, method, seq):
  config = config_defaults.base_config()
  config.adversarial.method = method
  config.train_steps = 1000
  config.model.dtype = args.dtype  # the rest of config.model as in training (dim 128, 1024 buckets)
  user_len, item_len = seq, args.item_len
  bert = BertConfig(vocab_size=30522, **BERTS[args.bert])
  domains = (DomainSpec("books", "rating", 1, 5), DomainSpec("movies", "rating", 1, 5),
             DomainSpec("music", "implicit"))
  model = CrossDomainRecommender(RecommenderConfig.from_config(config, bert=bert, domains=domains),
                                 rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  logical = sharding.logical_axes_tree(state)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  mesh = sharding.create_mesh({"data": -1})
  tx = optim.create_optimizer(config, params)
  shardings_ = steps.state_shardings(steps.abstract_train_state(params, tx), logical, tx,
                                     tuple(config.sharding_rules), mesh)
  state = steps.create_train_state(params, tx, shardings_, seed=config.seed)
  step = steps.jit_train_step(steps.make_train_step(graphdef, tx, steps.TaskTables.from_config(model.config), config),
                              shardings_, mesh)
  rng = np.random.default_rng(0)
  batches = [sharding.host_batch_to_global(_batch(rng, args.batch, user_len, item_len, 30522), mesh)
             for _ in range(2)]
  state, m = step(state, batches[0])     # compile
  jax.block_until_ready(m)
  t = time.perf_counter()
  for i in range(args.steps):           # no host sync inside the loop
    state, m = step(state, batches[i % 2])
  jax.block_until_ready(m)
  dt = time.perf_counter() - t
  memory = None
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    memory = stats["peak_bytes_in_use"]
  return args.batch * args.steps / dt, memory, bert, (user_len, item_len)


def torch_examples_per_second(args, seq):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig as HFConfig, BertForSequenceClassification  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  cfg = HFConfig(vocab_size=30522, num_labels=1, **BERTS[args.bert])
  model = BertForSequenceClassification(cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  amp = device == "cuda" and args.dtype == "bfloat16"
  length = seq + args.item_len
  ids = torch.randint(1000, 30522, (args.batch, length), device=device)
  mask = torch.ones_like(ids)
  labels = torch.rand(args.batch, 1, device=device)

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
      loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  step()
  if device == "cuda":
    torch.cuda.synchronize()
  t = time.perf_counter()
  for _ in range(args.steps):
    step()
  if device == "cuda":
    torch.cuda.synchronize()
  return args.batch * args.steps / (time.perf_counter() - t), device


def _define_flags(fv, argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = dict(flag_values=fv)
  flags.DEFINE_enum("bert", "minilm", sorted(BERTS), "Encoder shape.", **d)
  cli.define_number_list("seq", (64, 128), int, "User profile lengths, e.g. --seq=64,128.", fv)
  flags.DEFINE_integer("item_len", 32, "Item text length.", **d)
  flags.DEFINE_integer("batch", 16, "Global batch size.", **d)
  flags.DEFINE_integer("steps", 5, "Timed steps (after one compiling step).", **d)
  flags.DEFINE_string("dtype", "float32", "Compute dtype.", **d)
  flags.DEFINE_list("methods", ["none", "fgm", "pgd", "smart"], "Adversarial methods timed.", **d)
  flags.DEFINE_bool("no_torch", False, "Skip the PyTorch baseline.", **d)


def main(args):
  device = jax.devices()[0]
  peak = peak_flops(device)
  rows = []
  for seq in args.seq:
    baseline, torch_device = (None, None) if args.no_torch else torch_examples_per_second(args, seq)
    for method in args.methods:
      ex_s, memory, bert, lengths = jax_examples_per_second(args, method, seq)
      flops = model_flops_per_example(bert, lengths) * ex_s
      row = {"device": device.device_kind, "devices": jax.device_count(), "bert": args.bert,
             "dtype": args.dtype, "batch": args.batch, "user_len": seq, "item_len": args.item_len,
             "method": method, "examples_per_s": ex_s, "tokens_per_s": ex_s * sum(lengths),
             "model_flops_per_s": flops,
             "mfu": flops / (peak * jax.device_count()) if peak else None,
             "peak_memory_bytes": memory, "baseline_examples_per_s": baseline,
             "baseline_device": torch_device,
             "ratio_vs_baseline": ex_s / baseline if baseline else None}
      rows.append(row)
      mfu = f"MFU {row['mfu']:.1%}" if row["mfu"] is not None else f"{flops / 1e9:.1f} GFLOP/s (no peak for this device)"
      base = f", PyTorch baseline {baseline:.1f} ex/s, ratio {row['ratio_vs_baseline']:.2f}" if baseline else ""
      print(f"[{device.device_kind} x{jax.device_count()}] {args.bert} seq {seq}+{args.item_len} batch "
            f"{args.batch} {method:>5}: {ex_s:8.1f} ex/s, {row['tokens_per_s']:9.0f} tok/s, {mfu}{base}")
  print(json.dumps(rows))


if __name__ == "__main__":
  sys.exit(cli.run_absl(sys.argv, _define_flags, main))  # exit codes: crossrec_jax/cli.py
