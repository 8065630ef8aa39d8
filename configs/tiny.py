"""Tiny random BERT (2 layers, hidden 64) on small synthetic data: for tests and smoke runs."""

from crossrec_jax import config_defaults


def get_config():
  config = config_defaults.base_config()
  config.encoder_mode = "end_to_end"   # the end-to-end tests; the frozen ones override it
  config.model.checkpoint = "generated:tiny"
  config.model.dim = 32
  config.model.tower_dim = 32
  config.model.retrieval_dim = 16
  config.model.user_buckets = 64
  config.model.item_buckets = 64
  config.data.synthetic_users = 48
  config.data.items_per_domain = 24
  config.data.user_max_length = 32
  config.data.item_max_length = 16
  config.data.max_profile_items = 4
  config.data.eval_limit = 64
  config.batch_size = 8
  config.train_steps = 6
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 3
  config.async_checkpointing = False
  config.optim.warmup_steps = 2
  return config
