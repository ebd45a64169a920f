#!/usr/bin/env bash
# Creates (if needed) a Cloud TPU VM pod slice, installs flaxvae on every worker and
# trains on all of them. JAX finds the other workers itself on Cloud TPU.
#
# Needs: gcloud, authenticated, with a project and a zone that has TPU quota; the
# workdir should be a GCS bucket (gs://...) so every worker sees the same checkpoints.
# Example:
#   TPU_NAME=vae-pod ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh --config configs/fashion_mnist_conv.py --workdir gs://my-bucket/runs/conv
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
accelerator=${ACCELERATOR:-v4-32}
version=${TPU_SOFTWARE:-tpu-ubuntu2204-base}
repo_url=${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")}
: "${repo_url:?set REPO_URL to a clone URL the workers can reach}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$accelerator" --version "$version"
fi
ssh_all "set -e; [ -d flaxvae ] || git clone $repo_url flaxvae; cd flaxvae && git pull --ff-only;
  make install && .venv/bin/pip install -q -U 'jax[tpu]==0.10.2'"
args=$(printf ' %q' "$@")
ssh_all "cd flaxvae && .venv/bin/flaxvae train$args"
