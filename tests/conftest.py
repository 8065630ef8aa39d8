"""Every test process sees 8 forced CPU devices (set before jax is imported), so sharding
tests run on a real 8-device mesh while single-device tests use ``jax.devices()[:1]``."""

import os

# Appended, not set-if-absent: a CI runner's own XLA_FLAGS must not silently drop the 8 devices
# (a later flag overrides an earlier one, so ours wins over a different device count).
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is fetched from a hub in tests
# Link secrets generated for test data sets go to a temporary folder, not ~/.config.
if "CROSSREC_SECRETS_DIR" not in os.environ:  # made once, by the first process; workers inherit it
  os.environ["CROSSREC_SECRETS_DIR"] = __import__("tempfile").mkdtemp(prefix="crossrec_secrets_")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent compilation cache per test run, made here by the first process (xdist's
# controller) and inherited, like the secrets folder, by the xdist workers and every CLI
# subprocess they start: most tests compile the same tiny model's steps, and a cached
# executable is the one a fresh compile gives (the key is the program, the XLA flags and the
# devices). A size limit turns on JAX's file lock, so no process reads a half-written entry.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="crossrec_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import pathlib  # pylint: disable=wrong-import-position

import pytest  # pylint: disable=wrong-import-position

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  from crossrec_jax.models import testing
  from crossrec_jax.data import synthetic
  return testing.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bert"),
                                       extra_words=synthetic.vocabulary_words())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, config) of a finished configs/tiny.py run (6 steps, checkpoints 3 and 6), trained
  once per process for test_score, test_checkpoint_layout and test_train: read it only; a test
  that changes the run works on a copy."""
  from crossrec_jax import train  # pylint: disable=import-outside-toplevel
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("tiny_run") / "run"
  config = load_config(**{"data.data_dir": str(tmp_path_factory.mktemp("tfds"))})
  train.train_and_evaluate(config, workdir)
  return workdir, config


def shared_data(name):
  path = SHARED_DATA / name
  return pytest.mark.skipif(not path.is_dir(), reason=f"{path} is absent (licensed data, CI only)")(
      lambda f: f)


def pytest_sessionfinish(session):  # pylint: disable=unused-argument
  """The run's compilation cache ends with the process that made it."""
  if _OWN_COMPILATION_CACHE:
    __import__("shutil").rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
