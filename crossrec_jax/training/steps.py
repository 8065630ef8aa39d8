"""Train state, multi-task loss and the jitted, sharded train / encode steps."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from crossrec_jax import sharding
from crossrec_jax.training import adversarial
from crossrec_jax.training import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class TaskTables:
  """Per-domain constants the loss needs, as arrays indexed by domain id."""
  is_rating: tuple[bool, ...]
  low: tuple[float, ...]
  high: tuple[float, ...]
  weight: tuple[float, ...]

  @classmethod
  def from_config(cls, model_config, domain_weights=None):
    weights = dict(domain_weights or {})
    return cls(tuple(d.task == "rating" for d in model_config.domains),
               tuple(d.min_rating for d in model_config.domains),
               tuple(d.max_rating for d in model_config.domains),
               tuple(float(weights.get(d.name, 1.0)) for d in model_config.domains))


def _weighted_mean(x, w):
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-9)


def multitask_loss(model, out, batch, tables: TaskTables, loss_config):
  """Rating MSE (normalised scale) on explicit domains, BCE on implicit ones, plus in-batch
  softmax over retrieval scores for positives; rows with weight 0 (padding) are masked."""
  domain = batch["domain"]
  label = batch["label"]
  is_rating = jnp.asarray(tables.is_rating)[domain]
  low, high = jnp.asarray(tables.low)[domain], jnp.asarray(tables.high)[domain]
  w = batch["weight"] * jnp.asarray(tables.weight, jnp.float32)[domain]
  scale = jnp.where(is_rating, high - low, 1.0)

  mse = _weighted_mean(jnp.square((out["rating"] - label) / scale), w * is_rating)
  bce = _weighted_mean(optax.sigmoid_binary_cross_entropy(out["logit"], label), w * ~is_rating)
  positive = jnp.where(is_rating, (label - low) / scale >= loss_config.rating_positive_threshold,
                       label > 0)

  metrics = {"loss_rating": mse, "loss_bce": bce}
  loss = loss_config.rating_weight * mse + loss_config.bce_weight * bce
  if loss_config.inbatch_weight:
    users = jnp.take_along_axis(model.head.project_users(out["user"]), domain[:, None, None], 1)[:, 0]
    items = model.head.project_items(out["item"])[:, domain]          # [C, B, R]
    logits = jnp.einsum("br,cbr->bc", users, items) / loss_config.inbatch_temperature
    if loss_config.logq_correction:  # candidates arrive by popularity: correct for it
      logits = logits - batch["item_log_q"][None, :]
    rows = batch["item_row"]
    eye = jnp.eye(domain.shape[0], dtype=bool)
    candidates = ((domain[None, :] == domain[:, None]) & (batch["weight"][None, :] > 0)
                  & ((rows[None, :] != rows[:, None]) | eye))
    logits = jnp.where(candidates, logits, -1e9)
    softmax = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
    inbatch = _weighted_mean(softmax, w * positive)
    metrics["loss_inbatch"] = inbatch
    loss = loss + loss_config.inbatch_weight * inbatch
  return loss, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, tables: TaskTables, config
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Pure (state, batch) -> (state, metrics)."""
  adv_config, loss_config = config.adversarial, config.loss

  def step(state: TrainState, batch):
    rng, dropout_rng, adv_rng = jax.random.split(state.rng, 3)

    def total_loss(params):
      # Frozen parameters are constants here, so XLA drops their weight gradients and they
      # count in neither the clipping norm nor grad_norm.
      params = jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == optim.FROZEN else p,
                            params, optim.trainable_labels(params, config))
      embeds = nnx.merge(graphdef, params).embed_tokens(batch)

      def loss_of_embeds(e):
        # A model per pass, since the regularizers call this inside their own jax.grad and nnx
        # refuses to mutate a module across trace levels; a fresh stream from the same key, so
        # clean and perturbed passes share their dropout masks and only the perturbation differs.
        model = nnx.merge(graphdef, params)
        model.train(rngs=nnx.Rngs(dropout=dropout_rng))
        out = model(batch, embeds=e)
        loss, parts = multitask_loss(model, out, batch, tables, loss_config)
        return loss, {"rating": out["rating"], "logit": out["logit"], "parts": parts}

      def divergence_fn(adv, clean):
        is_rating = jnp.asarray(tables.is_rating)[batch["domain"]]
        scale = jnp.where(is_rating, (jnp.asarray(tables.high) - jnp.asarray(tables.low))[batch["domain"]], 1.0)
        return adversarial.divergence(adv, clean, scale, is_rating, batch["weight"])

      loss, (predictions, adv_metrics) = adversarial.regularized_loss(
          loss_of_embeds, embeds, adv_config, adv_rng, divergence_fn=divergence_fn)
      return loss, predictions["parts"] | adv_metrics

    (loss, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = metrics | {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return step


def new_train_state(params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
  """Step 0 of training ``params`` with ``tx`` (unsharded; see ``create_train_state``)."""
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))


def abstract_train_state(params, tx: optax.GradientTransformation) -> TrainState:
  """Shapes and dtypes of the train state, nothing allocated (for shardings and restores)."""
  return jax.eval_shape(lambda p: new_train_state(p, tx), params)


def create_train_state(params, tx: optax.GradientTransformation, shardings_: TrainState,
                       seed: int = 0) -> TrainState:
  """The initial train state laid out by ``shardings_`` (see ``state_shardings``): the optimizer
  state is created on the devices, sharded like the params, never replicated first.
  ``params``: full host (numpy) arrays, identical on every process."""
  global_params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
      params, shardings_.params)
  init = lambda p: new_train_state(p, tx, seed)
  return jax.jit(init, out_shardings=shardings_)(global_params)


def state_shardings(abstract_state: TrainState, logical_params, tx, rules, mesh) -> TrainState:
  """Params by their logical axes; optimizer moments like their params; the rest replicated."""
  del tx  # moments are matched to parameters by key path, whatever the optax nesting
  param_sh = sharding.tree_shardings(abstract_state.params, logical_params, rules, mesh)
  by_path = {tuple(sharding.key_name(k) for k in path): (leaf.shape, sh) for (path, leaf), sh in zip(
      jax.tree_util.tree_flatten_with_path(abstract_state.params)[0], jax.tree.leaves(param_sh))}
  rep = sharding.replicated(mesh)

  def like_param(path, leaf):
    keys = tuple(sharding.key_name(k) for k in path)
    for start in range(len(keys)):  # an optimizer moment's path ends with its parameter's path
      match = by_path.get(keys[start:])
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return rep

  opt_sh = jax.tree_util.tree_map_with_path(like_param, abstract_state.opt_state)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)


def jit_train_step(step_fn, shardings_: TrainState, mesh):
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(shardings_, batch_sh),
                 out_shardings=(shardings_, sharding.replicated(mesh)), donate_argnums=(0,))


def make_encode_fns(graphdef):
  """Eval-mode encoders and head (models are built in eval mode, so ``graphdef`` is one),
  pure functions of (params, inputs)."""
  def encode_users(params, ids, mask, bucket):
    return nnx.merge(graphdef, params).encode_users(ids, mask, bucket)

  def encode_items(params, ids, mask, bucket):
    return nnx.merge(graphdef, params).encode_items(ids, mask, bucket)

  def predict(params, batch):
    out = nnx.merge(graphdef, params)(batch)
    return {k: out[k] for k in ("rating", "logit", "retrieval", "user")}

  def project_items(params, items):
    return nnx.merge(graphdef, params).head.project_items(items)

  def project_users(params, users):
    return nnx.merge(graphdef, params).head.project_users(users)

  return encode_users, encode_items, predict, project_items, project_users
