"""BERT-base on a GPU host or a TPU slice: bf16 compute, FSDP over all devices.

Needs a local BERT-base checkpoint directory (config.json + model.safetensors), e.g. from
`huggingface-cli download bert-base-uncased --local-dir /ckpt/bert-base-uncased`.

python -m crossrec_jax.train --config configs/bert_base_accelerator.py --workdir gs://bucket/run \
    --config.model.checkpoint=/ckpt/bert-base-uncased --config.data.path=/data/amazon-arts-office
"""

from crossrec_jax import config_defaults


def get_config():
  config = config_defaults.base_config()
  config.encoder_mode = "end_to_end"  # what every setting below is for (fgm needs an encoder)
  config.model.checkpoint = "bert-base-uncased"   # a local directory on hosts without network
  config.model.dtype = "bfloat16"
  config.model.dim = 256
  config.model.user_buckets = 1 << 17
  config.model.item_buckets = 1 << 17
  config.data.source = "byo"
  config.data.user_max_length = 128
  config.data.item_max_length = 32
  config.batch_size = 256
  config.train_steps = 20000
  config.optim.learning_rate = 5e-4
  config.optim.encoder_lr_factor = 0.1
  config.optim.warmup_steps = 1000
  config.optim.schedule = "cosine"
  config.mesh.data = 1
  config.mesh.fsdp = -1                            # shard params + optimizer over every device
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.adversarial.method = "fgm"
  return config
