"""Amazon cross-domain data in the bring-your-own layout (e.g. Arts x Office: implicit domains,
given user split with cold test users).

python -m crossrec_jax.train --config configs/amazon_crossdomain.py --workdir runs/amazon \
    --config.data.path=/path/to/amazon-arts-office
"""

from crossrec_jax import config_defaults


def get_config():
  config = config_defaults.base_config()
  config.model.checkpoint = "embedded:all-MiniLM-L6-v2"
  config.model.user_buckets = 16384     # test users are cold: their IDs never reach the table
  config.model.item_buckets = 65536
  config.data.source = "byo"
  config.data.path = ""                 # required: --config.data.path=...
  config.data.user_max_length = 128
  config.data.item_max_length = 32
  config.data.max_profile_items = 10
  config.data.num_negatives = 1
  config.batch_size = 64
  config.train_steps = 5000
  config.optim.learning_rate = 1e-3
  config.optim.encoder_lr_factor = 0.05
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.best_metric = "office/ndcg@10"
  return config
