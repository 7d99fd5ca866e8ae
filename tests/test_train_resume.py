"""Interrupt and resume through the command line: SIGTERM (preemption) saves and exits, SIGKILL loses only what
followed the last checkpoint, and the resumed run ends exactly where an uninterrupted one does. Also: the
trainer's non-finite guard says what happened and stops.

Each run is `python -m unclip_jax.train` in a subprocess, through this file's __main__, which can make the
process signal itself (or feed a NaN) when the trainer fetches batch k: the interruption lands at a known step
however fast or slow the machine is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train_sharding import PRIOR_OVERRIDES, prior_config, subprocess_env

TOTAL = 24
TERM_AT, KILL_AT = 10, 19
NAN_AT = 3


def train_args(workdir: Path, **overrides) -> list[str]:
    # mesh 2x4 and PRIOR_OVERRIDES: test_train_sharding compiles the same train step.
    flags = dict(total_steps=TOTAL, checkpoint_every=8, keep_checkpoints=3, log_every=1, sample_every=0,
                 **{"mesh.data": 2, "mesh.fsdp": 4}, **PRIOR_OVERRIDES)
    flags.update(overrides)
    return (["--config", "configs/tiny.py:prior", "--workdir", str(workdir)]
            + [f"--config.{k}={v}" for k, v in flags.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    env = subprocess_env()
    repo = Path(__file__).resolve().parents[1]

    def run(workdir, *hooks, **overrides):
        cmd = [sys.executable, __file__, *hooks, "--", *train_args(workdir, **overrides)]
        return subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600)

    # Every run gets a NaN batch at step NAN_AT: skipped alike, it must not break the equality either.
    out = {"straight": run(root / "straight", f"--nan-at={NAN_AT}")}
    out["term"] = run(root / "interrupted", f"--nan-at={NAN_AT}", f"--signal-at={TERM_AT}:TERM")
    out["kill"] = run(root / "interrupted", f"--signal-at={KILL_AT}:KILL")
    out["resume"] = run(root / "interrupted")
    out["root"] = root
    return out


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def _checkpoint_params(workdir: Path, step: int):
    """A checkpoint written on 8 devices, read back onto this process's devices."""
    from unclip_jax.training import checkpoint, sharding, trainer
    config = prior_config()
    mesh = sharding.make_mesh(config.mesh)
    _, _, abstract, shardings = trainer.build(config, mesh)
    target = checkpoint.abstract_like(abstract, shardings)
    tree, _ = checkpoint.Checkpointer(workdir / "checkpoints").restore(target, step)
    return tree


def test_uninterrupted_run_finishes_and_exports_its_ema_weights(runs):
    r = runs["straight"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert (runs["root"] / "straight" / "tensorboard").is_dir()
    import jax
    from unclip_jax import load_component
    _, exported = load_component(runs["root"] / "straight" / "export", "prior")   # diffusers layout
    ema = _checkpoint_params(runs["root"] / "straight", TOTAL)["ema_params"]["prior"]
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_run_can_start_from_exported_weights(runs):
    """config.init_from: architecture and weights from a diffusers folder (here the run's own export)."""
    import jax
    from unclip_jax.training import sharding, trainer
    config = prior_config()
    config.init_from = str(runs["root"] / "straight" / "export")
    config.model.prior.num_layers = 5                     # ignored: the folder's config.json decides
    mesh = sharding.make_mesh(config.mesh)
    stage, tx, abstract, shardings = trainer.build(config, mesh)
    assert stage.modules["prior"].config.num_layers == 2
    state = trainer.initial_state(config, stage, tx, shardings)
    ema = _checkpoint_params(runs["root"] / "straight", TOTAL)["ema_params"]
    for x, y, z in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["ema_params"]), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(z))
    assert int(state["step"]) == 0


def test_sigterm_saves_a_checkpoint_at_that_step_and_exits_cleanly(runs):
    r = runs["term"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SIGTERM received" in r.stderr and f"checkpoint of step {TERM_AT} saved" in r.stderr


def test_sigkill_then_resume_from_the_last_complete_checkpoint(runs):
    assert runs["kill"].returncode == -signal.SIGKILL
    assert f"resumed from step {TERM_AT}" in runs["kill"].stderr
    r = runs["resume"]
    assert r.returncode == 0, r.stderr[-3000:]
    # The save of step 16 may or may not have finished when the process was killed at 19.
    assert "resumed from step 16" in r.stderr or f"resumed from step {TERM_AT}" in r.stderr


def test_resumed_run_ends_where_the_uninterrupted_one_does(runs):
    root = runs["root"]
    straight, resumed = _losses(root / "straight"), _losses(root / "interrupted")
    for step in range(TOTAL - 5, TOTAL + 1):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"loss differs at step {step}"
    a, b = _checkpoint_params(root / "straight", TOTAL), _checkpoint_params(root / "interrupted", TOTAL)
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    from safetensors.numpy import load_file
    ea = load_file(root / "straight" / "export" / "prior" / "diffusion_pytorch_model.safetensors")
    eb = load_file(root / "interrupted" / "export" / "prior" / "diffusion_pytorch_model.safetensors")
    assert ea.keys() == eb.keys()
    for k in ea:
        np.testing.assert_allclose(ea[k], eb[k], atol=1e-6, rtol=0, err_msg=k)


def test_nonfinite_step_is_skipped_with_a_warning(runs):
    for name in ("straight", "term"):
        err = runs[name].stderr
        assert f"step {NAN_AT}: loss nan" in err and "update skipped, parameters unchanged (1 in a row)" in err


# ------------------------------------------------------------------------------------ subprocess side


def _main(argv: list[str]) -> None:
    """[--signal-at=K:TERM|KILL] [--nan-at=K1,K2,...] -- <unclip_jax.train flags>"""
    split = argv.index("--")
    hooks, train_argv = argv[:split], argv[split + 1:]
    signal_at, nan_at = None, set()
    for h in hooks:
        if h.startswith("--signal-at="):
            k, name = h.split("=", 1)[1].split(":")
            signal_at = (int(k), getattr(signal, "SIG" + name))
        elif h.startswith("--nan-at="):
            nan_at = {int(k) for k in h.split("=", 1)[1].split(",")}

    from unclip_jax import train
    from unclip_jax.training import trainer

    make_source = trainer.make_source

    class Hooked:
        """The real source; at batch k (1-based, counting from the start of training) the process signals itself
        or the batch gets a NaN."""

        def __init__(self, source):
            self.source = source

        def __next__(self):
            batch = next(self.source)
            k = self.source.get_state()["index"]
            if signal_at and k == signal_at[0]:
                os.kill(os.getpid(), signal_at[1])
            if k in nan_at:
                batch = dict(batch, image_embeds=np.full_like(batch["image_embeds"], np.nan))
            return batch

        def get_state(self):
            return self.source.get_state()

        def set_state(self, state):
            self.source.set_state(state)

    trainer.make_source = lambda config, stage=None: Hooked(make_source(config, stage))
    from absl import app
    app.run(train.main, argv=[sys.argv[0]] + train_argv)


if __name__ == "__main__":
    _main(sys.argv[1:])
