"""The user-linkage secret and raw user IDs never leak: not into the data set, the workdir
(checkpoints, metrics, TensorBoard events, tokenizer, ...) nor the console output of prepare,
train and evaluate. Real data is never linked with the public demo secret."""

import json
import os
import pathlib
import stat

import pytest

from crossrec_jax import errors, evaluate, rundir, train
from crossrec_jax.data import DataError, SyntheticConfig, link_secret, prepare, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _byo_with_raw_ids(directory: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
  """Synthetic data in the bring-your-own layout, users renamed to e-mail-like raw IDs."""
  data = synthetic.export(directory, SyntheticConfig(num_users=24, items_per_domain=12))
  (data / "pairs.csv").unlink()
  lines = (data / "interactions.csv").read_text().splitlines()
  header = lines[0].split(",")
  col = header.index("user_id")
  raw = {}
  out = [lines[0]]
  for line in lines[1:]:
    fields = line.split(",")
    fields[col] = raw.setdefault(fields[col], f"jane.doe.{len(raw):03d}@example.org")
    out.append(",".join(fields))
  (data / "interactions.csv").write_text("\n".join(out) + "\n")
  return data, sorted(raw.values())


def _grep(root: pathlib.Path, needles) -> list[str]:
  hits = []
  for p in root.rglob("*"):
    if p.is_file():
      blob = p.read_bytes()
      hits += [f"{p}: {n}" for n in needles if n.encode() in blob]
  return hits


def _one_step_run(data, data_dir, workdir) -> list[str]:
  """The train command line of a one-step run on bring-your-own ``data``."""
  return ["train", f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.data.source=byo",
          f"--config.data.path={data}", "--config.train_steps=1", "--config.eval_every=0",
          "--config.data.eval_limit=8", "--config.adversarial.method=none"]


def test_secret_and_raw_ids_appear_in_no_file_and_no_output(tmp_path, monkeypatch, capfd):
  # A real one-step run (about a minute of compilation on 2 CPU cores): only a run writes every
  # artefact that could leak (tfds files, checkpoint metadata, metrics, TensorBoard events).
  secret = "kV9-private-linkage-secret-7f3e"
  monkeypatch.setenv("CROSSREC_LINK_SECRET", secret)
  data, raw_ids = _byo_with_raw_ids(tmp_path / "byo")
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  argv = _one_step_run(data, data_dir, workdir)
  assert train.cli_main(argv) == 0
  assert evaluate.cli_main(["evaluate", f"--workdir={workdir}", "--split=test",
                            "--limit=8"]) == 0
  out = capfd.readouterr()
  console = out.out + out.err
  needles = [secret] + raw_ids
  assert not [n for n in needles if n in console], "secret or raw user ID printed"
  assert not _grep(data_dir, needles), _grep(data_dir, needles)[:5]
  assert not _grep(workdir, needles), _grep(workdir, needles)[:5]
  assert (workdir / "tensorboard").is_dir() and list((workdir / "checkpoints").iterdir())
  # The checkpoint identifies the secret by its digest, so scoring can check it.
  meta_file = next((workdir / "checkpoints").glob("*/meta/metadata"))
  meta = json.loads(meta_file.read_text())
  assert meta["link_secret"]["digest"] == link_secret.digest(secret)
  assert meta["config"]["data"]["link_secret"] == ""
  assert rundir.scoring_secret(meta).value == secret
  monkeypatch.delenv("CROSSREC_LINK_SECRET")
  with pytest.raises(errors.ScoringError, match="CROSSREC_LINK_SECRET"):
    rundir.scoring_secret(meta)


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob("*")}


def test_a_wrong_secret_is_refused_at_evaluate_and_resume_and_changes_nothing(tmp_path, monkeypatch,
                                                                            capfd):
  """Evaluate and resume check the secret against the checkpoint's digest: with another one they
  would silently link a differently keyed copy of the data (every user a stranger to the model).
  The one-step run of the test above: its compiled programs come from the test run's cache."""
  right, wrong = "kV9-private-linkage-secret-7f3e", "another-teams-secret-51c0"
  monkeypatch.delenv("CROSSREC_LINK_SECRET_FILE", raising=False)
  monkeypatch.delenv("CROSSREC_TRACEBACK", raising=False)  # the one-line form is checked
  monkeypatch.setenv("CROSSREC_LINK_SECRET", right)
  data, _ = _byo_with_raw_ids(tmp_path / "byo")
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  argv = _one_step_run(data, data_dir, workdir)
  assert train.cli_main(argv) == 0
  capfd.readouterr()
  before = _snapshot(workdir)
  wrong_file = tmp_path / "wrong_secret"
  wrong_file.write_text(wrong + "\n")
  wrong_file.chmod(0o600)
  evaluate_argv = ["evaluate", f"--workdir={workdir}", "--split=test", "--limit=8"]
  monkeypatch.setenv("CROSSREC_LINK_SECRET", wrong)
  cases = [("evaluate, CROSSREC_LINK_SECRET", lambda: evaluate.cli_main(evaluate_argv),
            ["does not match environment CROSSREC_LINK_SECRET", link_secret.digest(right)]),
           ("resume, CROSSREC_LINK_SECRET", lambda: train.cli_main(
               [a.replace("train_steps=1", "train_steps=2") for a in argv]),
            ["linked with another secret", link_secret.digest(right), link_secret.digest(wrong)])]
  for name, run, words in cases:
    assert run() == 2, name
    out = capfd.readouterr()
    lines = [l for l in out.err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.err, (name, out.err[-3000:])
    assert all(w in lines[0] for w in words), (name, words, lines[0])
    assert not [s for s in (right, wrong) if s in out.out + out.err], f"{name}: a secret printed"
    assert _snapshot(workdir) == before, f"{name}: the workdir changed"
  monkeypatch.delenv("CROSSREC_LINK_SECRET")
  assert evaluate.cli_main(evaluate_argv + [f"--link_secret_file={wrong_file}"]) == 2
  lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and f"does not match file {wrong_file}" in lines[0], lines
  assert _snapshot(workdir) == before, "evaluate --link_secret_file: the workdir changed"
  right_file = tmp_path / "right_secret"  # the control: the training secret is accepted
  right_file.write_text(right + "\n")
  right_file.chmod(0o600)
  assert evaluate.cli_main(evaluate_argv + [f"--link_secret_file={right_file}"]) == 0, \
      capfd.readouterr().err[-3000:]


def test_real_data_gets_a_private_generated_secret_never_the_public_one(tmp_path, monkeypatch,
                                                                        capsys):
  monkeypatch.delenv("CROSSREC_LINK_SECRET", raising=False)
  monkeypatch.delenv("CROSSREC_LINK_SECRET_FILE", raising=False)
  monkeypatch.setenv("CROSSREC_SECRETS_DIR", str(tmp_path / "secrets"))
  data, _ = _byo_with_raw_ids(tmp_path / "byo")
  first = link_secret.resolve("byo", str(data))
  assert first.value != link_secret.DEMO_SECRET and len(first.value) >= 64
  path = pathlib.Path(first.origin.removeprefix("generated "))
  assert path.parent == tmp_path / "secrets" and data not in path.parents
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert str(path) in capsys.readouterr().err  # says where the secret is kept
  assert link_secret.resolve("byo", str(data)).value == first.value  # stable per data folder
  assert link_secret.resolve("synthetic").value == link_secret.DEMO_SECRET
  with pytest.raises(DataError, match="public demo constant"):
    link_secret.resolve("byo", str(data), configured=link_secret.DEMO_SECRET)
  # The data set is named by a digest; tfds' config log line shows no secret either.
  builder = prepare("byo", data, data_dir=str(tmp_path / "tfds"))
  assert first.value not in repr(builder.builder_config)
  assert first.value not in builder.builder_config.name
  assert not _grep(tmp_path / "tfds", [first.value])
