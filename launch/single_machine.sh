#!/usr/bin/env bash
# Train one unCLIP stage on one machine (all its GPUs, or a CPU for the tiny configs).
#
#   launch/single_machine.sh configs/tiny.py:decoder /tmp/tiny_decoder
#   launch/single_machine.sh configs/karlo_decoder.py:finetune /data/runs/decoder --config.batch_size=256
#
# Arguments: CONFIG[:ARG] WORKDIR [--config.key=value ...]. Running it again on the same WORKDIR resumes from
# the latest checkpoint. Ctrl-C / SIGTERM saves a checkpoint before exiting. On a multi-GPU machine one process
# drives every GPU (JAX SPMD); the mesh comes from config.mesh (default: all devices on the data axis).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."

# Reuse compiled programs across restarts (compilation of the Karlo-size steps takes minutes).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/unclip_jax/xla}
# Let XLA take most of the GPU memory up front rather than growing (fewer fragmentation OOMs).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

mkdir -p "$WORKDIR"
# exec: SIGTERM from the shell / scheduler reaches the trainer itself.
exec python -m unclip_jax.train --config "$CONFIG" --workdir "$WORKDIR" --distributed=off "$@" \
  2> >(tee -a "$WORKDIR/train.log" >&2)
