"""Train a stage of unCLIP.

    python -m unclip_jax.train --config configs/tiny.py:decoder --workdir /tmp/unclip_decoder
    python -m unclip_jax.train --config configs/karlo_decoder.py --workdir gs://bucket/decoder \
        --config.batch_size=2048 --config.mesh.fsdp=8

--config is a Python file with get_config(arg) (the part after ":" is the arg); any key can be overridden
with --config.<key>=<value>. Running the same command on a workdir that has checkpoints resumes the run.
On several hosts (TPU pod, SLURM), run the same command on every host: jax.distributed is initialised from
the environment (--distributed=auto), and each host feeds its own part of the global batch.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, samples and exports go.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto = when the environment shows several "
                                 "hosts (SLURM with more than one task, a multi-worker TPU VM, "
                                 "JAX_COORDINATOR_ADDRESS).")
flags.mark_flags_as_required(["config", "workdir"])


def _several_hosts() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    workers = env.get("TPU_WORKER_HOSTNAMES", "")  # set on multi-host TPU VMs
    return "," in workers


class _QuietLibraries(logging.Filter):
    """Keeps Orbax's per-save INFO chatter out of the training log (its warnings and errors still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
    del argv
    import jax

    if _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _several_hosts()):
        jax.distributed.initialize()
    absl_logging.use_absl_handler()
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    logging.getLogger("unclip_jax").setLevel(logging.INFO)

    from unclip_jax.training.trainer import train
    result = train(_CONFIG.value, _WORKDIR.value)
    if result.get("preempted"):
        logging.getLogger("unclip_jax").warning("stopped early (preempted) at step %d", result["step"])


if __name__ == "__main__":
    app.run(main)
