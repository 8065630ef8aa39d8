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

Training runs through the one loop (``training/loop.py``) on the frozen mode's mesh: the
train state (encoder + network params, optimizer state, step, the adversarial key) is sharded by
the logical-axis rules, the batches split over the batch axes, and the loop gives this mode
everything it gives the others: periodic Orbax checkpoints with the batch iterator's state (in
``workdir/tune/checkpoints``; a resume is exact), SIGTERM (save, exit 143), the finite-loss
check (exit 3, nothing saved), ``steps_per_run``, and ``eval_every`` / ``best_metric`` / early
stopping on the network's valid metrics (each evaluation re-encodes the catalog). The length is
``tune.epochs`` epochs of the frozen mode's batches at ``tune.batch_size``.

After training every item text is re-encoded with the tuned encoder; text-kNN is refitted on
the tuned vectors, item-kNN and the fusion weights are tuned again on valid, and valid / test are
evaluated as in the frozen mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from crossrec_jax import metric_writers, served, sharding, text_cache
from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax.training import adversarial, loop, optim
from crossrec_jax.training.inputs import apply_standardizer, standardizer
from crossrec_jax.training.hybrid import FittedHybrid, HybridBatches, _loss_fn, training_setup
from crossrec_jax.training.steps import TrainState, state_shardings
from crossrec_jax.data.from_config import resolve_model_checkpoint
from crossrec_jax.models import hf
from crossrec_jax.models.bert import masked_mean

SUBDIR = "tune"


# The scatter's index for a padding slot: past every table's rows, so ``mode="drop"`` drops it.
_DROPPED = np.int32(2**30)


def _refresh_rows(batch, num_items: int, limit: int) -> np.ndarray:
  """[limit] item rows to re-encode: the batch's targets, then its history items, each once, in
  order of appearance; padded with an out-of-range row (dropped by the scatter)."""
  weight = np.asarray(batch["weight"]) > 0
  key = next(k for k in ("seq_items", "hist_items", "hist") if k in batch)
  hist = np.asarray(batch[key]).reshape(-1)
  candidates = np.concatenate([np.asarray(batch["item"])[weight], hist[hist < num_items]])
  _, first = np.unique(candidates, return_index=True)
  rows = candidates[np.sort(first)][:limit]
  return np.concatenate([rows, np.full(limit - len(rows), _DROPPED)]).astype(np.int32)


def _live_text(encoder_graphdef, encoder_params, tokens, norm, table, embeds):
  """The text table with ``tokens["rows"]`` re-encoded from the word embeddings ``embeds``
  ([rows, T, H]); gradients flow to those rows only."""
  encoder = nnx.merge(encoder_graphdef, encoder_params)
  hidden, _ = encoder(None, tokens["mask"], inputs_embeds=embeds)
  live = apply_standardizer(masked_mean(hidden, tokens["mask"]), norm)
  return jax.lax.stop_gradient(table).at[tokens["rows"]].set(live, mode="drop")


def _objective(hybrid_loss, encoder_graphdef, norm, adv):
  """objective(params, batch, tokens, rng, tables) -> (L + w * L_adv, metrics): L the hybrid
  loss with its penalties, L_adv its data loss at the perturbed word embeddings of the
  re-encoded texts; ``tables``: the input tables on the mesh (their "text" the cached vectors)."""
  adv = adversarial.resolve(adv)

  def objective(params, batch, tokens, rng, tables):
    embeds = nnx.merge(encoder_graphdef, params["encoder"]).embed_tokens(tokens["ids"])

    def loss_of_embeds(e):
      text = _live_text(encoder_graphdef, params["encoder"], tokens, norm, tables["text"], e)
      data_loss, (_, reg) = hybrid_loss(params["hybrid"], batch, text=text, tables=tables)
      return data_loss, reg

    total, (reg, parts) = adversarial.regularized_loss(loss_of_embeds, embeds, adv, rng)
    metrics = {"loss": parts["loss_clean"], "reg": reg}
    if "loss_adversarial" in parts:
      metrics["adversarial"] = parts["loss_adversarial"]
    return total + reg, metrics

  return objective


def _make_step(objective, tx, shardings_: TrainState | None = None, mesh=None):
  """The jitted update, a pure function of (state, batch, tokens, tables) with the state
  donated; the adversarial draws (pgd's random start) come from (state.rng, state.step), so a
  resumed run draws the same ones."""

  def step(state: TrainState, batch, tokens, tables):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, batch, tokens, key, tables)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return dataclasses.replace(state, step=state.step + 1, opt_state=opt_state,
                               params=optax.apply_updates(state.params, updates)), metrics

  if shardings_ is None:
    return jax.jit(step, donate_argnums=(0,))
  return jax.jit(step, in_shardings=(shardings_, None, None, None),
                 out_shardings=(shardings_, sharding.replicated(mesh)), donate_argnums=(0,))


class TuneBatches(loop.ResumableIterator):
  """The frozen mode's batches (``HybridBatches``, on the host), each with the tokens of the
  items its step re-encodes, placed on the mesh by ``put``. Its state is the inner iterator's:
  the tokens are a function of the batch."""

  def __init__(self, inner: HybridBatches, ids, mask, num_items: int, limit: int, put):
    self.inner, self.ids, self.mask = inner, ids, mask
    self.num_items, self.limit, self.put = num_items, limit, put

  def __next__(self):
    d, batch, n = next(self.inner)
    rows = _refresh_rows(batch, self.num_items, self.limit)
    safe = np.minimum(rows, self.num_items - 1)
    tokens = {"rows": rows, "ids": self.ids[safe],
              "mask": self.mask[safe] * (rows < self.num_items)[:, None]}
    return d, self.put(batch), n, self.put(tokens)

  def get_state(self) -> bytes:
    return self.inner.get_state()

  def set_state(self, state: bytes) -> None:
    self.inner.set_state(state)


WARMUP_FRACTION = 0.05


def _optimizer_settings(ft, total_steps: int) -> optim.OptimizerSettings:
  return optim.OptimizerSettings(
      {"encoder": optim.Group(ft.encoder_learning_rate, weight_decay=0.01),
       "hybrid": optim.Group(ft.learning_rate)}, total_steps, warmup_fraction=WARMUP_FRACTION)


def _optimizer(ft, total_steps: int):
  return optim.make_optimizer(
      _optimizer_settings(ft, total_steps),
      lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()})


def _tokens(tokenizer, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Every item text tokenized as the text cache does (empty -> "[empty]"), one padded width."""
  texts = [t if t else "[empty]" for t in texts]
  enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length",
                  return_token_type_ids=False, return_tensors="np")
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _frozen(config, workdir: epath.Path):
  """The frozen run of ``workdir`` (trained now if it has none): data, raw cached item vectors,
  settings, its checkpoint description and the fitted hybrid network; or the frozen run's
  result when SIGTERM stopped it (``preempted``)."""
  data, text, settings, meta = served._inputs(config, workdir)  # pylint: disable=protected-access
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
  try:
    restored = served._restore(checkpointer, data, text, settings, meta, config)  # pylint: disable=protected-access
  finally:
    checkpointer.close()
  if restored is None:
    print("No frozen-mode checkpoint in this workdir: training the frozen mode first.", flush=True)
    cached = config.copy_and_resolve_references()
    with cached.unlocked():
      cached.encoder_mode = "frozen"
    result = served.train_and_evaluate(cached, workdir)
    if result.get("preempted") or "model" not in result:
      return result  # stopped (SIGTERM or steps_per_run): the same command goes on
    return _frozen(config, workdir)
  return data, text, settings, meta, restored[1]


def _encoder(config, workdir: epath.Path):
  # A local directory: hf.load_bert / load_tokenizer read local files only (see served._inputs).
  directory = resolve_model_checkpoint(config, workdir)
  return directory, hf.load_bert(directory)


def _fitted(data, text, settings, setup, hybrid_model, tuned_vectors) -> FittedHybrid:
  """The network over the tuned encoder's item vectors, mapped by the frozen run's
  standardisation (which the network was trained with)."""
  mapped = apply_standardizer(tuned_vectors, standardizer(text, settings.text_pca_dim))
  table = np.vstack([mapped, np.zeros((1, mapped.shape[1]))]).astype(np.float32)
  return FittedHybrid(hybrid_model, data, settings, setup.context, jnp.asarray(table),
                      setup.tables["profile"], setup.profile_rows, [],
                      {"items": setup.tables["tags"], "users": setup.tables["user_tags"]})


def _served(config, data, fitted: FittedHybrid, tuned_vectors, saved=None):
  """(served model, item-kNN params): the tuned network fused with item-item CF and the
  text-kNN of the tuned vectors; item-kNN params and the fusion tuned on valid unless a
  finished checkpoint's metadata ``saved`` holds them."""
  cf, knn = served.fit_cf(data, config, tuned_vectors,
                          _int_keys(saved.get("knn_params", {})) if saved else None)
  fused = (served.fusion_from_meta(saved, data) if saved
           else served.tune_fusion(fitted, cf, data, config))
  return served.ServedModel(fitted, cf, *fused), knn


def _params_abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _on_host(tree):
  """Every process of a multi-host run holds the whole tree (its arrays gathered)."""
  return jax.tree.map(sharding.to_host, tree) if jax.process_count() > 1 else tree


def _encode(checkpoint_dir, encoder_graphdef, encoder_params, data, config) -> np.ndarray:
  encoder = nnx.merge(encoder_graphdef, _on_host(encoder_params))
  return text_cache.TextEncoder(str(checkpoint_dir), encoder=encoder).encode(
      data.item_texts, config.data.item_max_length)


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


def _restore_final(workdir: epath.Path, encoder, hybrid_model, expected_meta=None):
  """(step, {"encoder", "hybrid"} params, meta) of the run's final tune-mode checkpoint."""
  params = {"encoder": nnx.to_pure_dict(nnx.split(encoder)[1]),
            "hybrid": nnx.to_pure_dict(nnx.split(hybrid_model)[1])}
  checkpointer = ckpt_lib.Checkpointer(workdir / SUBDIR / "checkpoints", keep=1,
                                       async_save=False)
  try:
    final = [s for s in checkpointer.all_steps() if "fusion_weights" in checkpointer.read_meta(s)]
    step, params, _, saved = checkpointer.restore(
        _params_abstract(params), expected_meta=expected_meta, max_step=final[-1],
        params_only=True)
  finally:
    checkpointer.close()
  return step, params, saved


def tuned_encoder(workdir, config, hybrid_model):
  """The encoder of the run's final tune-mode checkpoint (the one ``load`` serves)."""
  encoder = hf.load_bert(resolve_model_checkpoint(config, workdir))
  _, params, _ = _restore_final(epath.Path(workdir), encoder, hybrid_model)
  return nnx.merge(nnx.graphdef(encoder), params["encoder"])


def load(workdir, config, secret=None):
  """The served model of a run directory: the tune mode's when it has a tune checkpoint, else
  the frozen mode's (``served.load``). Returns (model, data, step)."""
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  if not has_tuned(workdir):
    return served.load(workdir, config, secret)
  data, text, settings, meta = served._inputs(config, workdir, secret)  # pylint: disable=protected-access
  settings = dataclasses.replace(settings, batch_size=config.tune.batch_size)
  setup = training_setup(data, settings, text)
  directory, encoder = _encoder(config, workdir)
  step, params, saved = _restore_final(workdir, encoder, setup.model, _meta(meta))
  vectors = _read_vectors(workdir, len(data.item_texts))
  if vectors is None:  # not saved (or unreadable): encode again with the tuned encoder
    vectors = _encode(directory, nnx.graphdef(encoder), params["encoder"], data, config)
  fitted = _fitted(data, text, settings, setup,
                   nnx.merge(nnx.graphdef(setup.model), params["hybrid"]), vectors)
  model, _ = _served(config, data, fitted, vectors, saved)
  return model, data, step


def _int_keys(saved: dict) -> dict:
  return {int(d): v for d, v in saved.items()}


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


def train_and_evaluate(config, workdir, progress_marker=None) -> dict[str, Any]:
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  workdir.mkdir(parents=True, exist_ok=True)
  ft = config.tune
  frozen = _frozen(config, workdir)
  if isinstance(frozen, dict):
    return frozen
  data, text, frozen_settings, meta, hybrid = frozen
  meta = _meta(meta)
  settings = dataclasses.replace(frozen_settings, batch_size=ft.batch_size)
  # The frozen mode's trainer gives the mesh, the batches' layout and the tables on the mesh.
  trainer = served.trainer_for(config, data, text, settings)
  setup, mesh = trainer.setup, trainer.mesh
  checkpoint_dir, encoder = _encoder(config, workdir)
  encoder_graphdef, encoder_state = nnx.split(encoder)
  hybrid_graphdef, hybrid_state = nnx.split(hybrid.model)
  norm = {k: jnp.asarray(v, jnp.float32)
          for k, v in standardizer(text, settings.text_pca_dim).items()}
  ids, mask = _tokens(hf.load_tokenizer(checkpoint_dir), data.item_texts,
                      config.data.item_max_length)
  total = ft.epochs * trainer.steps_per_epoch
  optimizer = _optimizer_settings(ft, total)
  tx = _optimizer(ft, total)
  params = {"encoder": nnx.to_pure_dict(encoder_state), "hybrid": nnx.to_pure_dict(hybrid_state)}
  logical = {"encoder": sharding.logical_axes_tree(encoder_state),
             "hybrid": sharding.logical_axes_tree(hybrid_state)}

  def new_state(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.key_data(jax.random.key(config.seed)))

  abstract = jax.eval_shape(new_state, params)
  shardings_ = state_shardings(abstract, logical, tx, tuple(config.sharding_rules), mesh)
  steps = {}
  for d in setup.examples:
    lo, hi = int(data.offsets[d]), int(data.offsets[d + 1])
    loss = _loss_fn(hybrid_graphdef, setup.tables, settings, data.domains[d]["task"], lo, hi,
                    setup.num_train)
    steps[d] = _make_step(_objective(loss, encoder_graphdef, norm, config.adversarial), tx,
                          shardings_, mesh)
  batches = TuneBatches(HybridBatches(data, setup, settings, put=lambda host: host), ids, mask,
                        data.num_items, ft.refresh_items, trainer.put)

  def step_fn(state, batch):
    d, arrays, _, tokens = batch
    return steps[d](state, arrays, tokens, trainer.tables)

  def fitted_of(params) -> FittedHybrid:
    vectors = _encode(checkpoint_dir, encoder_graphdef, params["encoder"], data, config)
    model = nnx.merge(hybrid_graphdef, _on_host(params["hybrid"]))
    return _fitted(data, text, settings, setup, model, vectors), vectors

  checkpointer = ckpt_lib.Checkpointer.from_config(config, workdir / SUBDIR / "checkpoints")
  try:
    restored = checkpointer.restore(ckpt_lib.abstract_like(abstract, shardings_),
                                    expected_meta=meta)
    saved = {}
    if restored is not None:
      step, state, data_state, saved = restored
      if data_state:
        batches.set_state(data_state)
      print(f"Resuming the tune mode at step {step} from {checkpointer.directory}", flush=True)
    else:
      step, state = 0, jax.jit(new_state, out_shardings=shardings_)(params)
    finished = "fusion_weights" in saved and step >= total  # else: a longer run goes on
    if not finished:
      writer = metric_writers.create_default_writer(workdir / SUBDIR)

      def mark(step):
        if progress_marker is not None:
          progress_marker.started = True

      try:
        result = loop.run_loop(
            loop.LoopSettings.from_config(config, total), state, step_fn, batches, start=step,
            checkpointer=checkpointer, meta=meta, writer=writer, examples=lambda batch: batch[2],
            evaluate=served.network_evaluator(config, data, writer,
                                              lambda state: fitted_of(state.params)[0]),
            learning_rate=optim.learning_rate(optimizer, ft.learning_rate), on_step=mark,
            show_progress=jax.process_index() == 0)
      finally:
        writer.close()
      if not result.finished:
        return {"step": result.step, "metrics": {}, "preempted": result.preempted}
      step, state = result.step, result.state

    # Serve what was trained: every item re-encoded by the tuned encoder, fusion re-tuned.
    fitted, vectors = fitted_of(state.params)
    model, knn = _served(config, data, fitted, vectors, saved if finished else None)
    if not finished:
      if step in checkpointer.all_steps():  # an early stop saved this step without weights
        checkpointer.manager.delete(step)
      if jax.process_index() == 0:
        _write_vectors(workdir, vectors)
      checkpointer.save(step, state, batches.get_state(), meta | model.fusion_meta() | {
          "knn_params": {str(d): p for d, p in knn.items()}})
  finally:
    checkpointer.close()
  results = served.evaluate_and_report(model, data, step, workdir / SUBDIR, "tune", config)
  served.report_fusion(model, data)
  return {"step": step, "metrics": results, "model": model}
