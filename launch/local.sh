#!/usr/bin/env bash
# Runs N flaxvae processes on this machine, talking over localhost with JAX's
# multi-process runtime (gloo CPU collectives): the way to check multi-host code
# without a cluster. Each process simulates DEVICES_PER_PROCESS CPU devices.
#
# Needs: `make install` (the .venv). Example, 2 processes x 2 devices = 4 devices:
#   launch/local.sh 2 --config configs/fashion_mnist_mlp.py --workdir runs/local2
# If one process fails, the others are stopped and the script exits with its status;
# rerunning the same command resumes from the last checkpoint.
set -euo pipefail
if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N [flaxvae train flags...]" >&2; exit 2
fi
n=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
flaxvae=${FLAXVAE:-$here/.venv/bin/flaxvae}
devices=${DEVICES_PER_PROCESS:-2}
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
  FLAXVAE_COORDINATOR_ADDRESS="127.0.0.1:$port" FLAXVAE_NUM_PROCESSES="$n" FLAXVAE_PROCESS_ID="$i" \
    "$flaxvae" train "$@" &
  pids+=($!)
done
status=0
for ((left = n; left > 0; left--)); do
  rc=0; wait -n || rc=$?
  if [ "$rc" != 0 ]; then
    [ "$status" = 0 ] && status=$rc
    kill "${pids[@]}" 2>/dev/null || true   # one failed: do not leave the others hanging
  fi
done
exit "$status"
