"""``config.encoder_mode = "tune"``: the encoder trained under the hybrid model, from the frozen run.

Starts from the frozen run of the same workdir (trained first when there is none): its hybrid
network and the pretrained encoder that produced its cached item vectors. Each step re-encodes
the texts of the batch's items (targets first, then history items, at most
``tune.refresh_items``) with the encoder being trained, maps them with the frozen run's
standardisation and puts them in place of their cached rows, then takes the frozen mode's loss: the
gradient reaches the encoder through every re-encoded item, while the rest of the catalog (the
softmax's other negatives) keeps its cached vector. Before the first step the model is exactly
the frozen run's. ``adversarial.method`` fgm or pgd perturbs the word embeddings of the
re-encoded texts, with the objective of every mode, L + w * L_adv (training/adversarial.py);
smart and apr are refused by ``config_check`` for this mode. The optimizer is the factory's
(training/optim.py): Adam on the hybrid network at ``tune.learning_rate``, AdamW (decay 0.01)
on the encoder at ``tune.encoder_learning_rate``, 5% warmup, cosine to 0.1 x each peak.

After training every item text is re-encoded with the tuned encoder, the fusion weights are
tuned again on valid and valid / test are evaluated as in the frozen mode. Checkpoints (Orbax, in
``workdir/tune/checkpoints``) hold the hybrid and encoder parameters and the optimizer
state after every epoch; re-running the command resumes from the newest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from crossrec_jax import errors, served, sharding, text_cache
from crossrec_jax.training import adversarial, optim
from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax.training.inputs import apply_standardizer, standardizer
from crossrec_jax.training.hybrid import (FittedHybrid, _loss_fn, epoch_batches,
                                          training_setup)
from crossrec_jax.data.from_config import resolve_model_checkpoint
from crossrec_jax.models import hf
from crossrec_jax.models.bert import masked_mean

SUBDIR = "tune"


def _refresh_rows(batch, num_items: int, limit: int) -> np.ndarray:
  """[limit] item rows to re-encode: the batch's targets, then its history items, each once, in
  order of appearance; padded with an out-of-range row (dropped by the scatter)."""
  weight = np.asarray(batch["weight"]) > 0
  hist = np.asarray(batch["hist_items"] if "hist_items" in batch else batch["hist"]).reshape(-1)
  candidates = np.concatenate([np.asarray(batch["item"])[weight], hist[hist < num_items]])
  _, first = np.unique(candidates, return_index=True)
  rows = candidates[np.sort(first)][:limit]
  return np.concatenate([rows, np.full(limit - len(rows), num_items + 1)]).astype(np.int32)


def _live_text(encoder_graphdef, encoder_params, tokens, norm, table, embeds):
  """The text table with ``tokens["rows"]`` re-encoded from the word embeddings ``embeds``
  ([rows, T, H]); gradients flow to those rows only."""
  encoder = nnx.merge(encoder_graphdef, encoder_params)
  hidden, _ = encoder(None, tokens["mask"], inputs_embeds=embeds)
  live = apply_standardizer(masked_mean(hidden, tokens["mask"]), norm)
  return jax.lax.stop_gradient(table).at[tokens["rows"]].set(live, mode="drop")


def _objective(hybrid_loss, encoder_graphdef, norm, table, adv):
  """objective(params, batch, tokens, rng) -> (L + w * L_adv, metrics): L the hybrid loss with
  its penalties, L_adv its data loss at the perturbed word embeddings of the re-encoded texts."""
  adv = adversarial.resolve(adv)

  def objective(params, batch, tokens, rng):
    embeds = nnx.merge(encoder_graphdef, params["encoder"]).embed_tokens(tokens["ids"])

    def loss_of_embeds(e):
      text = _live_text(encoder_graphdef, params["encoder"], tokens, norm, table, e)
      data_loss, (_, reg) = hybrid_loss(params["hybrid"], batch, text=text)
      return data_loss, reg

    total, (reg, parts) = adversarial.regularized_loss(loss_of_embeds, embeds, adv, rng)
    metrics = {"loss": parts["loss_clean"], "reg": reg}
    if "loss_adversarial" in parts:
      metrics["adversarial"] = parts["loss_adversarial"]
    return total + reg, metrics

  return objective


def _make_step(objective, tx):
  """The jitted update of (params, opt_state) on (batch, tokens of the re-encoded items, rng)."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch, tokens, rng):
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, tokens, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


WARMUP_FRACTION = 0.05


def _optimizer(ft, total_steps: int):
  return optim.make_optimizer(
      optim.OptimizerSettings({"encoder": optim.Group(ft.encoder_learning_rate, weight_decay=0.01),
                               "hybrid": optim.Group(ft.learning_rate)}, total_steps,
                              warmup_fraction=WARMUP_FRACTION),
      lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()})


def _tokens(tokenizer, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Every item text tokenized as the text cache does (empty -> "[empty]"), one padded width."""
  texts = [t if t else "[empty]" for t in texts]
  enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length",
                  return_token_type_ids=False, return_tensors="np")
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _frozen(config, workdir: epath.Path):
  """The frozen run of ``workdir`` (trained now if it has none): data, raw cached item vectors,
  settings, its checkpoint description and the fitted hybrid network."""
  data, text, settings, meta = served._inputs(config, workdir)  # pylint: disable=protected-access
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
  try:
    restored = served._restore(checkpointer, data, text, settings, meta)  # pylint: disable=protected-access
  finally:
    checkpointer.close()
  if restored is None:
    print("No frozen-mode checkpoint in this workdir: training the frozen mode first.", flush=True)
    cached = config.copy_and_resolve_references()
    with cached.unlocked():
      cached.encoder_mode = "frozen"
    served.train_and_evaluate(cached, workdir)
    return _frozen(config, workdir)
  return data, text, settings, meta, restored[1]


def _encoder(config, workdir: epath.Path):
  # A local directory: hf.load_bert / load_tokenizer read local files only (see served._inputs).
  directory = resolve_model_checkpoint(config, workdir)
  return directory, hf.load_bert(directory)


def _served(config, data, text, settings, setup, hybrid_model, tuned_vectors, weights=None):
  """The served model: the tuned network over the tuned encoder's item vectors (mapped by
  the frozen run's standardisation, which the network was trained with), fused with item-item CF;
  fusion weights tuned on valid unless given."""
  mapped = apply_standardizer(tuned_vectors, standardizer(text, settings.text_pca_dim))
  table = np.vstack([mapped, np.zeros((1, mapped.shape[1]))]).astype(np.float32)
  fitted = FittedHybrid(hybrid_model, data, settings, setup.context, jnp.asarray(table),
                        setup.tables["profile"], setup.profile_rows, [],
                        {"items": setup.tables["tags"], "users": setup.tables["user_tags"]})
  cf, _ = served.fit_cf(data, config, text)
  if weights is None:
    weights = served.tune_fusion(fitted, cf, data)
  return served.ServedModel(fitted, cf, weights)


def _params_abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def has_tuned(workdir) -> bool:
  """Whether the run directory holds a finished tune-mode model."""
  directory = epath.Path(workdir) / SUBDIR / "checkpoints"  # gs://bucket/run stays intact
  if not directory.is_dir():
    return False
  checkpointer = ckpt_lib.Checkpointer(directory, keep=1, async_save=False)
  try:
    return any("fusion_weights" in checkpointer.read_meta(s) for s in checkpointer.all_steps())
  finally:
    checkpointer.close()


def load(workdir, config, secret=None):
  """The served model of a run directory: the tune mode's when it has a tune checkpoint, else
  the frozen mode's (``served.load``). Returns (model, data, step)."""
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  if not has_tuned(workdir):
    return served.load(workdir, config, secret)
  checkpointer = ckpt_lib.Checkpointer(workdir / SUBDIR / "checkpoints", keep=1,
                                       async_save=False)
  try:
    final = [s for s in checkpointer.all_steps() if "fusion_weights" in checkpointer.read_meta(s)]
    data, text, settings, meta = served._inputs(config, workdir, secret)  # pylint: disable=protected-access
    settings = dataclasses.replace(settings, batch_size=config.tune.batch_size)
    setup = training_setup(data, settings, text)
    model = setup.model
    directory, encoder = _encoder(config, workdir)
    params = {"encoder": nnx.split(encoder)[1], "hybrid": nnx.split(model)[1]}
    step, params, _, saved = checkpointer.restore(
        _params_abstract(params), expected_meta=_meta(meta), max_step=final[-1],
        params_only=True)
  finally:
    checkpointer.close()
  nnx.update(model, params["hybrid"])
  vectors = _read_vectors(workdir, len(data.item_texts))
  if vectors is None:  # not saved (or unreadable): encode again with the tuned encoder
    nnx.update(encoder, params["encoder"])
    vectors = text_cache.TextEncoder(str(directory), encoder=encoder).encode(
        data.item_texts, config.data.item_max_length)
  weights = {int(d): w for d, w in saved["fusion_weights"].items()}
  return _served(config, data, text, settings, setup, model, vectors, weights), data, step


VECTORS_FILE = "item_vectors.npy"


def _read_vectors(workdir: epath.Path, num_items: int):
  path = workdir / SUBDIR / VECTORS_FILE
  try:
    if not path.exists():  # a bucket backend's "not found" need not be an OSError
      return None
    with path.open("rb") as f:  # np.load(path) would open "gs://..." as a local file
      vectors = np.load(f, allow_pickle=False)
  except (OSError, ValueError):
    return None
  return vectors if vectors.ndim == 2 and len(vectors) == num_items else None


def _write_vectors(workdir: epath.Path, vectors: np.ndarray) -> None:
  path = workdir / SUBDIR / VECTORS_FILE
  tmp = path.with_suffix(".tmp.npy")
  with tmp.open("wb") as f:  # np.save(path) would open "gs://..." as a local file
    np.save(f, vectors, allow_pickle=False)
  tmp.replace(path)  # never a truncated file under the final name (a bucket: copy + delete)


def _meta(frozen_meta):
  return frozen_meta | {"model": frozen_meta["model"] | {"encoder_mode": "tune"}}


def train_and_evaluate(config, workdir) -> dict[str, Any]:
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  workdir.mkdir(parents=True, exist_ok=True)
  ft = config.tune
  data, text, frozen_settings, meta, hybrid = _frozen(config, workdir)
  meta = _meta(meta)
  settings = dataclasses.replace(frozen_settings, batch_size=ft.batch_size)
  setup = training_setup(data, settings, text)
  hybrid_graphdef, hybrid_params = nnx.split(hybrid.model)
  checkpoint_dir, encoder = _encoder(config, workdir)
  encoder_graphdef, encoder_params = nnx.split(encoder)
  norm = {k: jnp.asarray(v, jnp.float32)
          for k, v in standardizer(text, settings.text_pca_dim).items()}
  ids, mask = _tokens(hf.load_tokenizer(checkpoint_dir), data.item_texts,
                      config.data.item_max_length)
  tx = _optimizer(ft, ft.epochs * sum(setup.steps_per_epoch.values()))
  # One placement for the whole state: the frozen run's network may come back sharded over the
  # mesh and the encoder on one device; the tune step runs replicated on every device.
  on_every_device = sharding.replicated(sharding.create_mesh({"data": -1}))
  params = jax.device_put({"encoder": encoder_params, "hybrid": hybrid_params}, on_every_device)
  opt_state = jax.device_put(tx.init(params), on_every_device)
  steps = {}
  for d in setup.examples:
    lo, hi = int(data.offsets[d]), int(data.offsets[d + 1])
    loss = _loss_fn(hybrid_graphdef, setup.tables, settings, data.domains[d]["task"], lo, hi,
                    setup.num_train)
    steps[d] = _make_step(_objective(loss, encoder_graphdef, norm, setup.tables["text"],
                                     config.adversarial), tx)

  checkpointer = ckpt_lib.Checkpointer(workdir / SUBDIR / "checkpoints", keep=1,
                                       async_save=False)
  try:
    restored = checkpointer.restore(_params_abstract({"params": params, "opt_state": opt_state}),
                                    expected_meta=meta)
    epoch0, saved = 0, {}
    if restored is not None:
      epoch0, state, _, saved = restored
      params, opt_state = jax.device_put((state["params"], state["opt_state"]), on_every_device)
      print(f"Resuming the tune mode after epoch {epoch0} from {checkpointer.directory}", flush=True)
    for epoch in range(epoch0, ft.epochs):
      rng = np.random.default_rng([config.seed, epoch])  # the same batches when resumed
      # pgd's random starts: one key per (epoch, batch), so a resumed run draws the same ones.
      adv_key = jax.random.fold_in(jax.random.key(config.seed), epoch)
      sums = {}
      for k, (d, batch) in enumerate(epoch_batches(data, setup, settings, rng)):
        rows = _refresh_rows(batch, data.num_items, ft.refresh_items)
        safe = np.minimum(rows, data.num_items - 1)
        tokens = {"rows": rows, "ids": ids[safe],
                  "mask": mask[safe] * (rows < data.num_items)[:, None]}
        params, opt_state, metrics = steps[d](params, opt_state, batch, tokens,
                                              jax.random.fold_in(adv_key, k))
        for key, value in metrics.items():
          sums.setdefault(f"{data.names[d]}/{key}", []).append(value)
      entry = {k: float(np.mean(jax.device_get(v))) for k, v in sums.items()}
      print(f"  tune epoch {epoch + 1}/{ft.epochs} " + " ".join(
          f"{k} {v:.4g}" for k, v in entry.items()), flush=True)
      if not all(np.isfinite(v) for v in entry.values()):
        raise errors.NonFiniteLossError(  # the CLI exits 3, as in every mode
            f"tune: non-finite loss in epoch {epoch + 1} ({entry}); not checkpointed. Lower "
            "tune.encoder_learning_rate / tune.learning_rate.")
      if epoch + 1 < ft.epochs:  # the last epoch is saved below, with what serving needs
        checkpointer.save(epoch + 1, {"params": params, "opt_state": opt_state}, None, meta)

    # Serve what was trained: every item re-encoded by the tuned encoder, fusion re-tuned.
    nnx.update(encoder, params["encoder"])
    nnx.update(hybrid.model, params["hybrid"])
    vectors = text_cache.TextEncoder(str(checkpoint_dir), encoder=encoder).encode(
        data.item_texts, config.data.item_max_length)
    model = _served(config, data, text, settings, setup, hybrid.model, vectors,
                    None if epoch0 < ft.epochs or "fusion_weights" not in saved else
                    {int(d): w for d, w in saved["fusion_weights"].items()})
    step = ft.epochs
    if step not in checkpointer.all_steps():
      if jax.process_index() == 0:
        _write_vectors(workdir, vectors)
      checkpointer.save(step, {"params": params, "opt_state": opt_state}, None, meta | {
          "fusion_weights": {str(d): w for d, w in model.weights.items()}})
  finally:
    checkpointer.close()
  results = served.evaluate_and_report(model, data, step, workdir / SUBDIR, "tune", config)
  return {"step": step, "metrics": results, "model": model}
