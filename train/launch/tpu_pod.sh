#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: (optionally) create the slice, put mnemax on every worker,
# and start `python -m train.main ... --distributed` on all workers at once.
#
#   TPU=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/lm_paper \
#     train/launch/tpu_pod.sh [--config.FIELD=VALUE ...]
#
# Every worker runs the same command; jax.distributed.initialize() finds the other workers from
# the TPU metadata (no addresses needed), and each worker feeds its share of every batch.
# Arguments after the script name are passed to train.main (config overrides).
#
# Environment (required):
#   TPU              name of the TPU VM (pod slice)
#   ZONE             its zone, e.g. us-central2-b
#   WORKDIR          run directory seen by EVERY worker (checkpoints are written collectively):
#                    a shared mount (NFS/Filestore, gcsfuse) or, where the trainer supports it,
#                    a gs:// URL. Rerunning with the same WORKDIR resumes.
# Environment (optional):
#   PROJECT          gcloud project (default: gcloud's configured project)
#   CREATE=1         create the slice first, with ACCELERATOR_TYPE (default v4-32) and
#                    RUNTIME_VERSION (default tpu-ubuntu2204-base); SPOT=1 adds --spot
#   CONFIG           config file and variant (default train/configs/lm.py:paper)
#   MNEMAX_SOURCE    "local" (default): copy this checkout to every worker;
#                    or a git URL (e.g. https://github.com/mnemax/mnemax) cloned on every worker,
#                    at MNEMAX_REF (default: the default branch)
#   INSTALL=0        skip installation (workers already set up by an earlier run)
#   PYTHON_VERSION   Python for the workers' venv, made with uv (default 3.12; mnemax needs ≥3.12
#                    and TPU VM images ship 3.10)
#   JAX_EXTRA        pip extra for the accelerator (default "jax[tpu]")
#   DETACH=1         start training under nohup (log: ~/mnemax-train.log on each worker) and
#                    return; default: stream worker output here until training ends
#   REMOTE_DIR       where the code lives on the workers (default: mnemax, under $HOME)
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORKDIR:?set WORKDIR to a run directory shared by every worker}"
CONFIG="${CONFIG:-train/configs/lm.py:paper}"
MNEMAX_SOURCE="${MNEMAX_SOURCE:-local}"
MNEMAX_REF="${MNEMAX_REF:-}"
INSTALL="${INSTALL:-1}"
CREATE="${CREATE:-0}"
SPOT="${SPOT:-0}"
DETACH="${DETACH:-0}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JAX_EXTRA="${JAX_EXTRA:-jax[tpu]}"
REMOTE_DIR="${REMOTE_DIR:-mnemax}"
VENV='$HOME/mnemax-venv'

gcloud_args=(--zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project "$PROJECT")
fi

# Runs a shell command on every worker of the slice.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU" "${gcloud_args[@]}" --worker=all --command "$1"
}

if [[ "$CREATE" == 1 ]]; then
  create_args=(--accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then
    create_args+=(--spot)
  fi
  echo "creating $TPU ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  gcloud compute tpus tpu-vm create "$TPU" "${gcloud_args[@]}" "${create_args[@]}"
fi

if [[ "$INSTALL" == 1 ]]; then
  if [[ "$MNEMAX_SOURCE" == local ]]; then
    # This checkout (with uncommitted edits), without virtual environments, runs or caches.
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    archive="$(mktemp -d)/mnemax.tar.gz"
    tar -C "$repo" -czf "$archive" \
      --exclude=.venv --exclude=.git --exclude=runs --exclude=figures \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .
    echo "copying $repo to ~/$REMOTE_DIR on every worker"
    gcloud compute tpus tpu-vm scp "$archive" "$TPU:mnemax.tar.gz" "${gcloud_args[@]}" --worker=all
    fetch="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf ~/mnemax.tar.gz"
  else
    branch=""
    if [[ -n "$MNEMAX_REF" ]]; then
      branch="--branch $(printf %q "$MNEMAX_REF")"
    fi
    fetch="rm -rf ~/$REMOTE_DIR && git clone --depth 1 $branch $(printf %q "$MNEMAX_SOURCE") ~/$REMOTE_DIR"
  fi
  # uv brings a Python ≥3.12 (TPU images ship 3.10) and installs mnemax editable plus JAX's TPU
  # wheels into one venv per worker, at the tested versions of constraints.txt (a checkout from
  # before that file installs without it).
  install="set -e; $fetch
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=\$HOME/.local/bin:\$PATH
[ -x $VENV/bin/python ] || uv venv --python $(printf %q "$PYTHON_VERSION") $VENV
lock=~/$REMOTE_DIR/constraints.txt; pin=; [ -f \$lock ] && pin=\"-c \$lock\"
uv pip install --python $VENV/bin/python \$pin -e ~/$REMOTE_DIR $(printf %q "$JAX_EXTRA")
$VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local TPU devices\")'"
  echo "installing mnemax on every worker"
  on_all_workers "$install"
fi

# The training command, quoted for the remote shell.
train_cmd="cd ~/$REMOTE_DIR && $VENV/bin/python -m train.main --config $(printf %q "$CONFIG")"
train_cmd+=" --workdir $(printf %q "$WORKDIR") --distributed"
for arg in "$@"; do
  train_cmd+=" $(printf %q "$arg")"
done

if [[ "$DETACH" == 1 ]]; then
  echo "starting training (detached) on every worker: $train_cmd"
  on_all_workers "nohup bash -c $(printf %q "$train_cmd") > ~/mnemax-train.log 2>&1 < /dev/null &"
  echo "logs: gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=0 --command 'tail -f ~/mnemax-train.log'"
else
  echo "training on every worker: $train_cmd"
  on_all_workers "$train_cmd"
fi
