"""MovieLens (ml-100k or ml-1m native files), one explicit domain, seeded random 80/20 split.

python -m crossrec_jax.train --config configs/movielens.py --workdir runs/ml100k \
    --config.data.path=/path/to/ml-100k
"""

from crossrec_jax import config_defaults


def get_config():
  config = config_defaults.base_config()
  config.model.checkpoint = "embedded:all-MiniLM-L6-v2"
  config.model.user_buckets = 4096
  config.model.item_buckets = 4096
  config.data.source = "movielens"
  config.data.path = ""                 # required: --config.data.path=...
  config.data.split = "ratio"
  config.data.ratio = (0.8, 0.0, 0.2)   # the usual random 80/20 split (seed = config.seed)
  config.data.eval_split = "test"
  config.data.user_max_length = 96
  config.data.item_max_length = 24
  config.data.max_profile_items = 10
  config.batch_size = 64
  config.train_steps = 3000
  config.optim.learning_rate = 1e-3
  config.optim.encoder_lr_factor = 0.05
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.best_metric = "movies/rmse"
  return config
