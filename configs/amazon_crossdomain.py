"""Amazon cross-domain data in the bring-your-own layout (e.g. Arts x Office: implicit domains,
given user split with cold test users): the frozen encoder mode fused with item-kNN, EASE and
text-kNN, the model benchmarks/RESULTS.md reports (benchmarks/bench_quality.py trains exactly
this run through the same ``train_and_evaluate``).

python -m crossrec_jax.train --config configs/amazon_crossdomain.py --workdir runs/amazon \
    --config.data.path=/path/to/amazon-arts-office
"""

from crossrec_jax import config_defaults


def get_config():
  config = config_defaults.base_config()
  config.encoder_mode = "frozen"        # the hybrid model's settings: training/inputs.py IMPLICIT
  config.model.checkpoint = "embedded:all-MiniLM-L6-v2"
  config.data.source = "byo"
  config.data.path = ""                 # required: --config.data.path=...
  config.data.item_max_length = 32      # tokens per item text for the frozen vectors
  config.eval.sampled_negatives = 999   # also the sampled protocol papers report
  config.eval_every = 0
  config.checkpoint_every = 200
  config.best_metric = "office/ndcg@10"  # the checkpoint kept as best (with eval_every > 0)
  return config
