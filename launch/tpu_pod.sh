#!/usr/bin/env bash
# Train one unCLIP stage on a Cloud TPU VM pod slice: create the slice, copy this repository to every worker,
# install, and run the same command on all workers (one process per host; JAX finds the others itself).
#
#   launch/tpu_pod.sh create                                   # once: the TPU VM slice
#   launch/tpu_pod.sh setup                                    # copy the code, pip install on every worker
#   launch/tpu_pod.sh run configs/karlo_decoder.py gs://my-bucket/runs/decoder --config.mesh.fsdp=8
#   launch/tpu_pod.sh logs                                     # follow worker 0's log
#   launch/tpu_pod.sh stop                                     # SIGTERM: checkpoint and exit on every worker
#   launch/tpu_pod.sh delete
#
# Settings (environment): TPU_NAME (unclip), ZONE (us-central2-b), ACCELERATOR (v4-32), VERSION
# (tpu-ubuntu2204-base), PROJECT (gcloud's default). WORKDIR should be a gs:// path (Orbax writes to GCS
# directly) so that every host sees the checkpoints. Preemptible / spot slices: add --spot to `create`; a
# preempted slice sends SIGTERM, the trainer saves, and `run` again resumes.
set -euo pipefail

TPU_NAME=${TPU_NAME:-unclip}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=unclip_jax

ssh_all() {  # runs a command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

cmd=${1:-}
shift || true
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" "$@"
    ;;
  setup)
    tar -C "$REPO_DIR" --exclude=.git -czf /tmp/unclip_jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/unclip_jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/unclip_jax.tgz && cd ~/$REMOTE_DIR && \
             pip install -U 'jax[tpu]' -e . tensorboardX"
    ;;
  run)
    CONFIG=${1:?usage: tpu_pod.sh run CONFIG WORKDIR [--config.key=value ...]}
    WORKDIR=${2:?usage: tpu_pod.sh run CONFIG WORKDIR [--config.key=value ...]}
    shift 2
    # nohup + setsid: the run survives the ssh session; `stop` finds it by its pid file.
    ssh_all "cd ~/$REMOTE_DIR && export JAX_COMPILATION_CACHE_DIR=$WORKDIR/xla_cache && \
             setsid nohup python -m unclip_jax.train --config $CONFIG --workdir $WORKDIR --distributed=on $* \
             > ~/train.log 2>&1 < /dev/null & echo \$! > ~/train.pid"
    echo "started on every worker; follow with: $0 logs"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 --command="tail -f ~/train.log"
    ;;
  stop)
    ssh_all "kill -TERM \$(cat ~/train.pid)"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    ;;
  *)
    sed -n '2,18p' "$0"; exit 2
    ;;
esac
