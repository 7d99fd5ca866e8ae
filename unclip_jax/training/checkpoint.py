"""Checkpoints with Orbax: train state, data-iterator position and config, saved asynchronously, resumed
automatically, restorable onto any mesh.

    ckpt = Checkpointer(workdir / "checkpoints", config)
    if ckpt.latest_step() is not None:
        tree, data_state = ckpt.restore(abstract_tree)     # ShapeDtypeStructs carrying the NEW shardings
    ckpt.save(step, state.checkpointed(), source.get_state())
    ckpt.close()                                           # waits for the last asynchronous save

A checkpoint is a step folder with three items: "state" (step, params, opt_state, ema_params, rng: Orbax
arrays, each saved shard by shard), "data" (JSON) and "config" (JSON, for the record). Restoring reads each
array straight into the sharding the abstract target asks for, so a checkpoint written on a (2, 4) mesh
restores onto (8, 1), one device, or another host count.

Preemption: `PreemptionWatcher` turns SIGTERM into a flag the loop checks between steps (single host); on
several hosts JAX's preemption sync point makes every host stop at the same step.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory, config=None, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.config_json = json.loads(config.to_json_best_effort()) if config is not None else {}
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, tree: dict, data_state: dict, *, force: bool = False) -> bool:
        """Starts an (asynchronous) save of step `step`; returns whether one was started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(self.config_json))
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, abstract_tree: dict, step: int | None = None) -> tuple[dict, dict]:
        """(state tree laid out as `abstract_tree`'s shardings, data state) of `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree),
                                                                 data=ocp.args.JsonRestore()))
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> dict:
    """ShapeDtypeStructs with the given shardings: the restore target for a tree shaped like `tree`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class PreemptionWatcher:
    """SIGTERM (what a preempted TPU VM or a SLURM job at its time limit receives) -> `reached(step)` is True
    at the next step boundary, so the loop saves a final checkpoint and exits cleanly."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        if jax.process_count() == 1:  # on several hosts JAX's own preemption notifier owns SIGTERM
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. a test harness): no handler, no preemption checks
                pass

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
        self.signalled = True

    def reached(self, step: int) -> bool:
        if self.signalled:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is off
                return False
        return False

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
