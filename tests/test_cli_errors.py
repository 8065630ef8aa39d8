"""Every user mistake on a command line: one line naming the flag / file and the fix, exit code
2, no traceback unless asked for, and nothing left behind (files compared before / after).

The CLIs run in-process (``cli_main(argv)``) with the tiny config, so each case costs well under
a second; one case goes through ``python -m`` to check the real entry point's exit code.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from crossrec_jax import cli, errors, evaluate, rundir, score, train
from crossrec_jax.data import SyntheticConfig, from_config, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
AMAZON = str(ROOT / "configs" / "amazon_crossdomain.py")


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob("*")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A tmp root with prepared tiny data (synthetic and bring-your-own, so failing cases that
  get as far as the data add nothing to the cache), inputs for scoring and a foreign workdir."""
  root = tmp_path_factory.mktemp("cli")
  data_dir = root / "tfds"
  byo = synthetic.export(root / "byo", SyntheticConfig(num_users=30, items_per_domain=10))
  (byo / "pairs.csv").unlink()
  for config_file, overrides in ((TINY, {}), (AMAZON, {"path": str(byo)})):
    config = _load(config_file)
    config.data.data_dir = str(data_dir)
    for k, v in overrides.items():
      config.data[k] = v
    from_config.prepare_data(config)
  (root / "a_file").write_text("not a directory\n")
  (root / "empty_run").mkdir()
  foreign = root / "foreign" / "checkpoints" / "5"  # a checkpoint folder of another program
  foreign.mkdir(parents=True)
  (foreign / "weights.bin").write_bytes(b"\0" * 16)
  (root / "existing.parquet").write_bytes(b"old")
  return root


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _train(root, *flags, config=TINY):
  return [f"--config={config}", f"--workdir={root / 'run'}",
          f"--config.data.data_dir={root / 'tfds'}", *flags]


def _score(root, *flags, output="out.parquet", checkpoint="foreign"):
  byo = root / "byo"
  return [f"--checkpoint={root / checkpoint}", f"--users={byo / 'interactions.csv'}",
          f"--items={byo / 'items.csv'}", f"--output={root / output}", *flags]


# (cli, argv builder, words the one-line message must contain)
CASES = {
    # train: flags and config values, all refused before data or compilation
    "train_no_workdir": ("train", lambda r: [f"--config={TINY}"], ["--workdir"]),
    "train_missing_config_file": ("train", lambda r: [f"--config={r / 'nope.py'}",
                                                      f"--workdir={r / 'run'}"], ["nope.py"]),
    "train_unknown_config_field": ("train", lambda r: _train(r, "--config.nope=1"), ["config.nope"]),
    "train_bad_value_type": ("train", lambda r: _train(r, "--config.batch_size=abc"),
                             ["batch_size"]),
    "train_bad_adversarial_method": ("train", lambda r: _train(r, "--config.adversarial.method=fgx"),
                                     ["--config.adversarial.method", "fgm"]),
    "train_bad_split": ("train", lambda r: _train(r, "--config.data.split=random"),
                        ["--config.data.split", "leave_last_out"]),
    "train_bad_source": ("train", lambda r: _train(r, "--config.data.source=csv"),
                         ["--config.data.source", "byo"]),
    "train_bad_encoder_mode": ("train", lambda r: _train(r, "--config.encoder_mode=both"), ["--config.encoder_mode"]),
    "train_zero_batch": ("train", lambda r: _train(r, "--config.batch_size=0"),
                         ["--config.batch_size", "positive"]),
    "train_adversarial_weight": ("train", lambda r: _train(r, "--config.adversarial.weight=2.0"),
                                 ["--config.adversarial.weight"]),
    "train_best_metric_unknown_domain": ("train", lambda r: _train(
        r, "--config.best_metric=office/ndcg@10"), ["--config.best_metric", "office", "music"]),
    "train_best_metric_wrong_task": ("train", lambda r: _train(
        r, "--config.best_metric=books/ndcg@10"), ["--config.best_metric", "rmse"]),
    "train_best_metric_malformed": ("train", lambda r: _train(r, "--config.best_metric=ndcg"),
                                    ["--config.best_metric", "DOMAIN/METRIC"]),
    "train_patience_without_metric": ("train", lambda r: _train(
        r, "--config.early_stopping_patience=2"), ["--config.early_stopping_patience"]),
    "train_byo_without_path": ("train", lambda r: _train(r, "--config.data.source=byo"),
                               ["--config.data.path"]),
    "train_missing_data_path": ("train", lambda r: _train(
        r, "--config.data.source=byo", f"--config.data.path={r / 'absent'}"),
        ["--config.data.path", "absent"]),
    "train_missing_mapping_file": ("train", lambda r: _train(
        r, f"--config.data.mapping_file={r / 'map.csv'}"), ["--config.data.mapping_file", "map.csv"]),
    "train_workdir_is_a_file": ("train", lambda r: [f"--config={TINY}", f"--workdir={r / 'a_file'}"],
                                ["--workdir", "a_file", "is a file"]),
    "train_workdir_inside_a_file": ("train", lambda r: [
        f"--config={TINY}", f"--workdir={r / 'a_file' / 'run'}"], ["--workdir", "not writable"]),
    "train_public_secret_on_real_data": ("train", lambda r: _train(
        r, "--config.data.source=byo", f"--config.data.path={r / 'byo'}",
        "--config.data.link_secret=crossrec-default-secret"), ["link_secret", "public"]),
    # the shipped Amazon config on data without an `office` domain: refused before compiling
    "train_amazon_config_without_office": ("train", lambda r: _train(
        r, f"--config.data.path={r / 'byo'}", "--config.model.checkpoint=generated:tiny",
        config=AMAZON), ["--config.best_metric", "office", "books"]),
    # a run that fails after creating its workdir (missing encoder) leaves no workdir
    "train_missing_model_checkpoint": ("train", lambda r: _train(
        r, f"--config.model.checkpoint={r / 'no_bert'}"), ["no_bert"]),
    # evaluate
    "evaluate_mistyped_workdir": ("evaluate", lambda r: [f"--workdir={r / 'rnu'}"],
                                  ["--workdir", "rnu", "does not exist"]),
    "evaluate_not_a_run": ("evaluate", lambda r: [f"--workdir={r / 'empty_run'}"],
                           ["--workdir", "checkpoints"]),
    "evaluate_workdir_is_a_file": ("evaluate", lambda r: [f"--workdir={r / 'a_file'}"],
                                   ["--workdir", "is a file"]),
    "evaluate_unknown_flag": ("evaluate", lambda r: [f"--workdir={r / 'empty_run'}", "--splitt=x"],
                              ["--splitt"]),
    "evaluate_negative_limit": ("evaluate", lambda r: [f"--workdir={r / 'empty_run'}", "--limit=-1"],
                                ["--limit"]),
    # score
    "score_missing_flag": ("score", lambda r: [f"--checkpoint={r / 'foreign'}"], ["--users"]),
    "score_negative_top_k": ("score", lambda r: _score(r, "--top_k=-3"), ["--top_k"]),
    "score_pairs_and_top_k": ("score", lambda r: _score(
        r, "--top_k=3", f"--pairs={r / 'byo' / 'interactions.csv'}"), ["--pairs", "--top_k"]),
    "score_unknown_suffix": ("score", lambda r: _score(r, "--top_k=3", output="out.json"),
                             ["--output", ".json", ".parquet"]),
    "score_format_mismatch": ("score", lambda r: _score(r, "--top_k=3", "--format=csv"),
                              ["--format", "--output"]),
    "score_existing_output": ("score", lambda r: _score(r, "--top_k=3", output="existing.parquet"),
                              ["--output", "existing.parquet", "--overwrite"]),
    "score_missing_output_dir": ("score", lambda r: _score(r, "--top_k=3", output="nodir/o.csv"),
                                 ["--output", "nodir", "does not exist"]),
    "score_missing_users_file": ("score", lambda r: _score(r, "--top_k=3") + [
        f"--users={r / 'users.csv'}"], ["--users", "users.csv"]),
    "score_mistyped_checkpoint": ("score", lambda r: _score(r, "--top_k=3", checkpoint="forieng"),
                                  ["--checkpoint", "forieng"]),
    "score_not_a_workdir": ("score", lambda r: _score(r, "--top_k=3", checkpoint="empty_run"),
                            ["--checkpoint", "not a training workdir"]),
    "score_workdir_of_another_program": ("score", lambda r: _score(r, "--top_k=3"),
                                         ["foreign", "another program or model"]),
}
MAINS = {"train": train.cli_main, "evaluate": evaluate.cli_main, "score": score.cli_main}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistake_is_one_line_exit_2_and_leaves_nothing(env, case, capsys, monkeypatch):
  monkeypatch.delenv("CROSSREC_TRACEBACK", raising=False)
  name, argv, words = CASES[case]
  before = snapshot(env)
  code = MAINS[name]([name] + argv(env))
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert code == errors.EXIT_USER_ERROR, err[-3000:]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  for word in words:
    assert word in lines[0], (word, lines[0])
  assert snapshot(env) == before, "files were left behind or changed"


def test_verbose_or_environment_shows_the_traceback(env, capsys, monkeypatch):
  argv = ["train"] + _train(env, "--config.data.split=random")
  assert train.cli_main(argv + ["--verbose"]) == 2
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.setenv("CROSSREC_TRACEBACK", "1")
  assert train.cli_main(argv) == 2
  assert "Traceback" in capsys.readouterr().err


def test_bench_scripts_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import bench_quality  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  code = cli.main_of(lambda: bench_quality.main(["--data", str(tmp_path / "absent")]), [])
  err = capsys.readouterr().err
  assert code == 2 and err.count("error:") == 1 and "--data" in err
  code = cli.main_of(lambda: bench_quality.main(["--data", str(tmp_path), "--k", "x"]), [])
  err = capsys.readouterr().err
  assert code == 2 and "--k" in err and "Traceback" not in err


def test_python_m_entry_point_exit_code(tmp_path):
  """The real ``python -m`` path: exit 2 and one line (no absl usage dump, no traceback)."""
  out = subprocess.run([sys.executable, "-m", "crossrec_jax.train", f"--config={TINY}",
                        f"--workdir={tmp_path / 'run'}", "--config.data.split=random"],
                       capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "CROSSREC_TRACEBACK"})
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith("error: --config.data.split='random'")
  assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_gs_workdir_reaches_orbax_unchanged(monkeypatch):
  """``gs://bucket/run`` stays a bucket URL all the way to Orbax (pathlib would make it
  ``gs:/bucket/run``). No network: Orbax's manager and the bucket's file checks are faked."""
  from etils import epath
  from crossrec_jax import checkpoint as ckpt_lib, config_check
  gpath = type(epath.Path("gs://bucket/run"))
  monkeypatch.setattr(gpath, "exists", lambda self: True)  # an existing run in the bucket
  monkeypatch.setattr(gpath, "is_dir", lambda self: True)
  seen = []

  class FakeManager:
    def __init__(self, directory, **kwargs):
      del kwargs
      seen.append(directory)

  monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", FakeManager)
  workdir = config_check.check_workdir("gs://bucket/run")   # what train / evaluate do first
  assert str(workdir) == "gs://bucket/run"
  ckpt_lib.Checkpointer(workdir / "checkpoints")              # what train builds
  run_dir, ckpt_dir = rundir.checkpoint_paths("gs://bucket/run")  # what score resolves
  ckpt_lib.Checkpointer(ckpt_dir)
  assert [str(d) for d in seen] == ["gs://bucket/run/checkpoints"] * 2
  assert str(run_dir) == "gs://bucket/run"


def test_score_links_users_exactly_as_training_with_a_mapping_file(tmp_path):
  """With data.mapping_file, scoring keys each history by the mapped person (as training did):
  one person's rows on two platforms form one user whose key is training's key."""
  import types
  from crossrec_jax import config_defaults
  from crossrec_jax.data import SourceConfig, load_and_process
  from crossrec_jax.data.link_secret import LinkSecret
  from crossrec_jax.data.processing import link_key
  from crossrec_jax.data.records import read_interactions
  from crossrec_jax.serving.scorer import Scorer, with_mapping
  (tmp_path / "items.csv").write_text(
      "item_id,domain,title\nb1,books,the dark city\nb2,books,tea\ns1,shop,blue pen\ns2,shop,paper\n")
  (tmp_path / "interactions.csv").write_text(
      "user_id,domain,item_id,label,timestamp\nalice@books,books,b1,5,1\nA-77,shop,s1,1,2\n"
      "alice@books,books,b2,2,3\nA-77,shop,s2,1,4\nbob@books,books,b2,4,1\nbob@books,books,b1,3,2\n")
  mapping = tmp_path / "mapping.csv"
  mapping.write_text("domain,user_id,person_id\nbooks,alice@books,person-1\nshop,A-77,person-1\n")
  config = config_defaults.base_config()
  config.data.source, config.data.path = "byo", str(tmp_path)
  config.data.mapping_file = str(mapping)
  secret = LinkSecret("s3cret", "test")
  trained = load_and_process(SourceConfig("byo", str(tmp_path),
                                          processing=from_config.processing_config(config, secret)))
  train_keys = {r["user_key"] for recs in trained["examples"].values() for r in recs}
  engine = types.SimpleNamespace(step=0, domains=["books", "shop"],
                                 tasks={"books": "rating", "shop": "implicit"})
  scorer = Scorer(engine, mode="end_to_end", checkpoint_dir=tmp_path, config=config,
                  link_secret=secret)
  history = read_interactions(tmp_path / "interactions.csv")
  people = scorer.link(history)
  assert sorted(people.histories) == ["bob@books", "person-1"]
  assert {x.domain for x in people.histories["person-1"]} == {"books", "shop"}
  assert {link_key(people.processing.link_secret, p) for p in people.histories} == train_keys
  assert people.of("shop", "A-77") == "person-1"
  # The mapping moved: --mapping_file points the scorer at it; a missing one is a clear error.
  config.data.mapping_file = str(tmp_path / "gone.csv")
  with pytest.raises(errors.ScoringError, match="--mapping_file"):
    with_mapping(config, None)
  scorer.config = with_mapping(config, str(mapping))
  assert sorted(scorer.link(history).histories) == ["bob@books", "person-1"]


def test_corrupt_newest_checkpoint_falls_back_loudly_naming_both_steps(tmp_path, capsys):
  import numpy as np
  from crossrec_jax import checkpoint as ckpt_lib
  state = {"w": np.arange(4, dtype=np.float32)}
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=3, async_save=False)
  for step in (3, 6):
    ckpt.save(step, {"w": state["w"] + step}, None, {"model": {}})
  ckpt.close()
  for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\0garbage" * 4)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  abstract = {"w": _abstract(state["w"])}
  step, restored, _, _ = ckpt.restore(abstract)
  ckpt.close()
  err = capsys.readouterr().err
  assert step == 3 and float(restored["w"][0]) == 3.0
  assert "WARNING" in err and "step 6" in err and "restored step 3" in err


def _abstract(x):
  import jax
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_sharding_logs_each_replicated_parameter_once(caplog):
  """A dimension the mesh cannot divide (hidden 12 on a 8-way fsdp axis) stays replicated and
  says so, once per parameter name, not once per array (params and Adam moments share names)."""
  import jax
  from crossrec_jax import sharding
  mesh = sharding.create_mesh({"fsdp": -1})
  tree = {"odd_layer": {"kernel": jax.ShapeDtypeStruct((12, 16), "float32")},
          "ok": jax.ShapeDtypeStruct((16, 16), "float32")}
  logical = {"odd_layer": {"kernel": ("embed", "mlp")}, "ok": ("embed", "mlp")}
  with caplog.at_level("WARNING", logger="crossrec_jax.sharding"):
    for _ in range(3):
      out = sharding.tree_shardings(tree, logical, sharding.DEFAULT_RULES, mesh)
  assert out["odd_layer"]["kernel"].spec == jax.sharding.PartitionSpec(None, None)
  assert out["ok"].spec == jax.sharding.PartitionSpec("fsdp", None)
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1 and "odd_layer/kernel" in messages[0] and "12" in messages[0], messages
