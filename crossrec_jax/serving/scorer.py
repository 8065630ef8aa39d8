"""``Scorer``: one serving interface for a run of any encoder mode.

``Scorer.from_checkpoint(workdir)`` reads the run's mode (``encoder_mode``) and loads its model:
a frozen or tune run as ``serving.hybrid.HybridModel`` (the network fused with item-kNN / EASE /
text-kNN, exactly as it was evaluated), an end-to-end run as
``serving.end_to_end.EndToEndModel`` (the two-tower BERT). ``scorer.model`` is that engine.
Either way users come as histories, linked to training's users exactly as training linked them
(same secret and mapping file); candidates are an items table, whose items need not have been in
training (a new item is scored from its text). ``recommend`` streams the top-K per user and
domain (one kernel, ``ranking.streamed_top_k``), ``score`` scores given pairs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Iterable, Iterator, Sequence

import ml_collections

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import config_defaults
from crossrec_jax import rundir
from crossrec_jax.data import processing, records
from crossrec_jax.data.from_config import processing_config
from crossrec_jax.errors import ScoringError
from crossrec_jax.serving.end_to_end import EndToEndModel
from crossrec_jax.serving.hybrid import HybridModel
from crossrec_jax.training import tune

ENCODER_MODES = ("frozen", "tune", "end_to_end")


def encoder_mode(workdir, meta: dict) -> str:
  """The encoder mode of the run in ``workdir``, given its checkpoint description ``meta``
  (from ``checkpoints/``): "tune" where the workdir holds a finished tune-mode model (tune
  writes it beside the frozen run it starts from), else the recorded ``model.encoder_mode``
  (end-to-end checkpoints record none)."""
  mode = (meta.get("model") or {}).get("encoder_mode") or "end_to_end"
  if mode not in ENCODER_MODES:
    raise ckpt_lib.CheckpointIncompatibleError(
        f"{workdir}: checkpoint of encoder mode {mode!r}, not one of {ENCODER_MODES}; score it "
        "with the crossrec_jax version that trained it")
  return "tune" if mode == "frozen" and tune.has_tuned(workdir) else mode


def with_mapping(config, mapping_file: str | None):
  """The training config with ``mapping_file`` (if given) in place of its data.mapping_file,
  checked to exist: without the mapping, users would be linked otherwise than in training."""
  if mapping_file is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.mapping_file = mapping_file
  if config.data.get("mapping_file") and not pathlib.Path(config.data.mapping_file).is_file():
    raise ScoringError(f"the model was trained with data.mapping_file={config.data.mapping_file}, "
                       "which does not exist here; pass --mapping_file with that mapping")
  return config


@dataclasses.dataclass
class People:
  """A request's users, linked as training linked them."""
  histories: dict[str, list[records.Interaction]]   # person -> their interactions, every platform
  key: Callable[[str], str]                         # person -> the training's user key
  of: Callable[[str, str], str]                     # (domain, user_id) -> person
  processing: processing.ProcessingConfig           # training's profile and linkage settings


class Scorer:
  """A restored run of any encoder mode: ``recommend`` (top-K) and ``score`` (pairs)."""

  def __init__(self, model: EndToEndModel | HybridModel, *, mode: str, checkpoint_dir, config,
               link_secret):
    self.model, self.mode, self.checkpoint_dir = model, mode, checkpoint_dir
    self.config, self.link_secret = config, link_secret
    self.step, self.domains, self.tasks = model.step, model.domains, model.tasks

  @classmethod
  def from_checkpoint(cls, path, *, step: int | None = None, batch_size: int = 256,
                      devices=None, secret_file: str = "", mapping_file: str | None = None
                      ) -> "Scorer":
    """The run of a training workdir (or its checkpoints/ folder), whatever its encoder mode.
    ``step`` None: the newest restorable step (end-to-end: a corrupt newest one is skipped with a
    warning naming both steps); ``scorer.step`` says which step was restored. ``batch_size``
    and ``devices``: the end-to-end encoders'. ``secret_file`` / ``mapping_file``: where the
    training's linkage secret and mapping are, if not where training had them."""
    workdir, ckpt_dir = rundir.checkpoint_paths(path)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
      available = checkpointer.all_steps()
      if not available:
        raise ScoringError(f"{ckpt_dir}: no checkpoint inside")
      if step is not None and step not in available:
        raise ScoringError(f"{ckpt_dir}: no step {step}; available: {available}")
      meta = rundir.newest_meta(checkpointer, [step] if step is not None else available)
    finally:
      checkpointer.close()
    mode = encoder_mode(workdir, meta)
    try:
      config = with_mapping(config_defaults.saved_config(meta["config"]), mapping_file)
    except (KeyError, TypeError, ValueError) as e:
      if isinstance(e, ScoringError):
        raise
      raise ckpt_lib.CheckpointIncompatibleError(
          f"{ckpt_dir}: checkpoint description is not from this crossrec_jax version ({e}); "
          "re-export it with the version that trained it.") from e
    secret = rundir.scoring_secret(meta, secret_file)
    if mode == "end_to_end":
      model = EndToEndModel.load(workdir, ckpt_dir, meta, step=step, batch_size=batch_size,
                                 devices=devices)
    else:
      model = HybridModel.load(workdir, config, secret, mode)
      if step is not None and step != model.step:
        raise ScoringError(f"{ckpt_dir}: a {mode}-mode run serves its final model (step "
                           f"{model.step}), not step {step}; drop --step")
    return cls(model, mode=mode, checkpoint_dir=ckpt_dir, config=config, link_secret=secret)

  # -- requests ---------------------------------------------------------------------------------
  def link(self, history: Sequence[records.Interaction]) -> People:
    """Histories grouped by person, keyed as training keyed its users."""
    config = processing_config(self.config, self.link_secret)
    by_person, key, person_of = processing.linked_histories(history, config)
    return People(dict(by_person), key, person_of, config)

  def _request(self, history, items, domains, source):
    unknown = sorted({d for d, _ in items} - set(self.domains))
    if unknown:
      raise ScoringError(f"{source}: domain(s) {unknown} are not domains of this model "
                         f"({sorted(self.domains)})")
    wanted = list(domains) if domains else list(self.domains)
    for name in wanted:
      if name not in self.domains:
        raise ScoringError(f"--domains: unknown domain {name!r}; this model has "
                           f"{sorted(self.domains)}")
    return self.link(records.check_against_items(list(history), items, source)), wanted

  def recommend(self, history: Iterable[records.Interaction], items: dict[tuple[str, str], records.Item],
                k: int, *, domains: Sequence[str] | None = None, chunk_users: int = 4096,
                source: str = "items", progress=None) -> Iterator[dict]:
    """Top-``k`` items per user and domain, left out the user's own items: column chunks
    {user_id, domain, rank, item_id, score}, one per chunk of users (``user_id``: the person,
    i.e. the mapping's person_id where training had a mapping). ``history``: the users'
    interactions (``records.read_interactions``); ``items``: the candidates with their text
    (``records.read_items``), trained or not; ``source`` names them in errors."""
    if k <= 0:
      raise ScoringError(f"--top_k {k} must be positive (items per user and domain)")
    people, wanted = self._request(history, items, domains, source)
    if not people.histories:
      raise ScoringError("the users file has no user")
    return self.model.recommend(people, items, wanted, k, chunk_users, progress)

  def score(self, history: Iterable[records.Interaction], items: dict[tuple[str, str], records.Item],
            pairs: Sequence[tuple[str, str, str]], *, domains: Sequence[str] | None = None,
            places: Sequence[str] | None = None, chunk_users: int = 4096, source: str = "items",
            progress=None) -> Iterator[dict]:
    """Scores of (user_id, item_id, domain) ``pairs`` (of the wanted ``domains``): column chunks
    {user_id, item_id, domain, task, score[, retrieval_score]}; ``score`` is the predicted
    rating on rating domains, on implicit ones the interaction probability (end-to-end) or the
    fused score that ranks the item in the user's top-K (frozen / tune). ``places[n]`` names
    pair n in errors (a file and line)."""
    people, wanted = self._request(history, items, domains, source)
    chosen = []
    for n, (u, i, d) in enumerate(pairs):
      place = places[n] if places is not None else f"pair {n + 1}"
      if d not in self.domains:
        raise ScoringError(f"{place}: field domain {d!r} is not a domain of this model "
                           f"({sorted(self.domains)})")
      if (d, i) not in items:
        raise ScoringError(f"{place}: field item_id {i!r} of domain {d!r} is not in the items file")
      if d in wanted:
        chosen.append((u, i, d))
    if not chosen:
      raise ScoringError(f"no pairs to score: none is in the domains asked for ({wanted})")
    for u, _, d in chosen:
      if not people.histories.get(people.of(d, u)):
        raise ScoringError(f"user {people.of(d, u)!r} has no history in the users file: scoring "
                           "needs at least one interaction (cold users: include their history)")
    return self.model.score(people, items, chosen, chunk_users, progress)
