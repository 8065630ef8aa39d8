"""MovieLens (ml-100k or ml-1m native files), one explicit domain, seeded random 80/20 split:
the frozen encoder mode, the model benchmarks/RESULTS.md reports (benchmarks/bench_quality.py
trains exactly this run through the same ``train_and_evaluate``).

python -m crossrec_jax.train --config configs/movielens.py --workdir runs/ml100k \
    --config.data.path=/path/to/ml-100k
"""

from crossrec_jax import config_defaults


def get_config():
  config = config_defaults.base_config()
  config.encoder_mode = "frozen"        # the hybrid model's settings: training/inputs.py EXPLICIT
  config.model.checkpoint = "embedded:all-MiniLM-L6-v2"
  config.data.source = "movielens"
  config.data.path = ""                 # required: --config.data.path=...
  config.data.split = "ratio"
  config.data.ratio = (0.8, 0.0, 0.2)   # the usual random 80/20 split (seed = config.seed)
  config.data.eval_split = "test"
  config.data.item_max_length = 32      # tokens per item text for the frozen vectors
  config.eval_every = 0                 # full-batch epochs: evaluated once, at the end
  config.checkpoint_every = 100
  config.best_metric = "movies/rmse"
  return config
