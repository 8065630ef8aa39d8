"""Every training option with its default; config files in configs/ start from ``base_config()``."""

import ml_collections

from crossrec_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32                 # global
  c.train_steps = 0                 # 0: the mode's own length (frozen: hybrid.epochs); end_to_end sets it
  c.log_every = 10
  c.eval_every = 200                # 0: only at the end
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.best_metric = ""                # e.g. "music/ndcg@10" or "books/rmse"
  c.best_mode = "max"               # max | min (rmse/mae are minimised automatically)
  c.early_stopping_patience = 0     # evals without improvement of best_metric; 0 disables
  c.async_checkpointing = True
  c.steps_per_run = 0               # > 0: save and stop after this many steps (time-sliced jobs)

  # Where the item text vectors come from (one model for every mode; README "Architecture"):
  # "frozen" (the default, the measured winner): the pretrained encoder is frozen, item texts are
  # encoded once and cached, and the hybrid model (biases, ID factors, history term, text
  # projections; crossrec_jax/training/hybrid.py) trains on the cached vectors, fused with
  # item-item CF for implicit domains. "tune": starts from the frozen run of the same workdir
  # (training it first if missing) and trains the encoder under the hybrid model
  # (crossrec_jax/training/tune.py); its checkpoints and metrics go to workdir/tune.
  # "end_to_end": the from-scratch two-tower BERT model (crossrec_jax/models/recommender.py),
  # kept for accelerators; it has not beaten the frozen mode on real data.
  c.encoder_mode = "frozen"
  c.tune = ml_collections.ConfigDict(dict(
      epochs=1, batch_size=256, refresh_items=256,  # items re-encoded per step (targets first)
      learning_rate=1e-4, encoder_learning_rate=2e-5))
  # The hybrid model (the frozen mode and the tune mode's network): None keeps the measured
  # default for the data's kind (training.inputs.EXPLICIT / IMPLICIT); any field of
  # training.inputs.HybridSettings but APR's, which config.adversarial sets (method "apr").
  placeholder = ml_collections.config_dict.placeholder
  c.hybrid = ml_collections.ConfigDict({name: placeholder(kind) for name, kind in (
      ("dim", int), ("epochs", int), ("batch_size", int), ("learning_rate", float),
      ("num_negatives", int), ("use_text", bool), ("use_history", bool),
      ("use_history_text", bool), ("use_ids", bool), ("use_biases", bool), ("use_tags", bool),
      ("cross_domain", bool))})
  # CF + deep fusion (implicit domains; weights tuned on valid).
  c.fusion = ml_collections.ConfigDict(dict(
      # item-kNN's k x shrinkage grid, tuned per domain on valid (one value each: no tuning).
      components=("item_knn", "ease", "text_knn"), knn_k=(20, 50, 100, 200),
      knn_shrink=(0.0, 10.0, 20.0, 50.0), ease_lambda=30.0, text_knn_k=50,
      # EASE's weights are a dense [n, n] matrix per domain: past this many items it is fitted
      # on the most popular ones (a notice says so); 0: no bound (sized against free memory).
      ease_max_items=20_000,
      # valid queries (per domain, a seeded sample) that tune item-kNN and the fusion weights;
      # their cost is these queries x the catalog per grid point. 0: all.
      max_tuning_queries=5_000,
      # Cold items (<= eval.cold_item_max_train train interactions) get a text-kNN boost and an
      # offset tuned on valid (fusion.ColdItems). Off: on Amazon Arts x Office valid chose an
      # offset that lowered test (benchmarks/RESULTS.md, session 10).
      cold_item_terms=False))
  c.text_cache = ""                 # frozen text vectors' cache folder; "": WORKDIR/text_cache

  # Evaluation (crossrec_jax/evaluation.py): HR / NDCG / Recall / MRR at each of ``ks``, with
  # cold-user and cold-item (at most cold_item_max_train train interactions) slices. Next to the
  # full-catalog ranking, sampled_negatives > 0 also ranks each target against that many
  # negatives of its domain (uniform, the user's own items left out), drawn once from ``seed``
  # (kept apart from c.seed: runs with other training seeds meet the same negatives).
  c.eval = ml_collections.ConfigDict(dict(
      ks=(10, 20), sampled_negatives=0, seed=0, cold_item_max_train=2))

  c.model = ml_collections.ConfigDict(dict(
      checkpoint="embedded:all-MiniLM-L6-v2",  # HF dir, hub id (online), embedded:..., generated:tiny
      dim=128, pooling="mean", user_buckets=1024, item_buckets=1024, tower_dim=128,
      retrieval_dim=64, num_experts=0, tied_init=False, dtype="float32"))

  c.data = ml_collections.ConfigDict(dict(
      source="synthetic", path="", data_dir="", bad_rows="fail", domains=(),
      split="auto", ratio=(0.8, 0.1, 0.1),
      # User-linkage secret: "" resolves it (file / CROSSREC_LINK_SECRET / generated per data
      # set; see crossrec_jax/data/link_secret.py). Never stored in checkpoints or logs.
      link_secret="", link_secret_file="",
      # Declared label semantics per domain, e.g. "books=1:5,movies=0.5:5" and
      # "music=implicit"; undeclared domains are inferred from clean labels (README: Data).
      rating_scales="", domain_tasks="",
      mapping_file="", max_profile_items=12, max_items_per_domain=8, max_profile_words=200,
      synthetic_users=400, items_per_domain=120,
      user_max_length=64, item_max_length=24, num_negatives=1,
      eval_split="valid", test_split="test", eval_limit=0))  # eval_limit 0: whole split

  # The end_to_end mode's optimizer (training/optim.py: one factory and warmup rule for every
  # mode; the frozen mode takes hybrid.learning_rate / warmup_fraction, the tune mode tune.*).
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, encoder_lr_factor=1.0, schedule="linear", warmup_steps=100,
      end_lr_factor=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
      accumulate_steps=1, freeze_encoder_layers=0, trainable_patterns=(),
      no_decay_patterns=("bias$", "scale$", "embedding$")))

  c.loss = ml_collections.ConfigDict(dict(
      rating_weight=10.0, bce_weight=1.0, inbatch_weight=1.0, inbatch_temperature=1.0,
      logq_correction=True,
      rating_positive_threshold=0.75, domain_weights={}))

  # One objective in every mode: L + weight * L_adv, L_adv the loss at the worst case within
  # an L2 ball of radius eps (training/adversarial.py). method: none | fgm | pgd | smart (word
  # embeddings, per example over tokens x hidden; tune: fgm, pgd; end_to_end: all three) |
  # apr (user / item vectors, per vector; frozen). Off by default: APR was measured not to help
  # the served model. eps / weight None: the method's default (adversarial.DEFAULTS).
  c.adversarial = ml_collections.ConfigDict(dict(
      method="none", eps=placeholder(float), weight=placeholder(float),
      step_size=0.01, steps=2, noise=1e-3))  # pgd / smart: K ascent steps of step_size

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = tuple(DEFAULT_RULES)

  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1))  # or JAX_COORDINATOR_ADDRESS etc.
  return c


def saved_config(saved: dict) -> ml_collections.ConfigDict:
  """The config a run saved in its checkpoint, over today's defaults: a key added since the run
  was trained takes its default, so older runs still load."""
  config = base_config()
  config.update(saved)
  return config
