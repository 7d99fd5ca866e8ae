"""Sharded training equals single-device training, parameters are really sharded, and checkpoints move
between meshes. Runs in a subprocess with 8 simulated CPU devices (XLA_FLAGS set before jax is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MESHES = {"2x4 data-fsdp": dict(data=2, fsdp=4, tensor=1), "2x4 fsdp-tensor": dict(data=1, fsdp=2, tensor=4)}


def subprocess_env() -> dict:
    """8 CPU devices, a cheap XLA CPU backend (these tests measure equality, not speed) and a persistent
    compilation cache shared by the subprocesses and kept between sessions ($UNCLIP_JAX_TEST_XLA_CACHE,
    default ~/.cache/unclip_jax/test_xla; it is keyed by program, flags and jax version, so it is never stale)."""
    cache = os.environ.get("UNCLIP_JAX_TEST_XLA_CACHE") or Path("~/.cache/unclip_jax/test_xla").expanduser()
    env = dict(os.environ)
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true")
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def tiny_config(stage: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(stage)


# The prior as test_train_resume trains it through the command line: same program, one compilation.
PRIOR_OVERRIDES = dict(lr_schedule="constant", clip_stats="keep", compute_dtype="float32")


def prior_config():
    c = tiny_config("prior")
    for k, v in PRIOR_OVERRIDES.items():
        c[k] = v
    return c


def run_job(test_file: str, out: Path, timeout: float = 900) -> dict:
    """Runs `test_file`'s __main__ (the heavy half of its tests) in a subprocess; returns its results.json."""
    with open(out / "stderr.txt", "w") as log:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / test_file), str(out)], env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, (out / "stderr.txt").read_text()[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_job("test_train_sharding.py", tmp_path_factory.mktemp("sharding"))


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_step_equals_single_device_step(results, mesh):
    r = results["meshes"][mesh]
    assert r["init_max_diff"] == 0.0, "sharded initialisation drew different parameters"
    assert abs(r["loss"] - results["single"]["loss"]) <= 1e-5
    assert r["params_max_diff"] <= 1e-5, f"parameters after one step differ by {r['params_max_diff']}"
    assert r["ema_max_diff"] <= 1e-5


@pytest.mark.parametrize("mesh", list(MESHES))
def test_parameters_and_optimizer_state_are_sharded(results, mesh):
    r = results["meshes"][mesh]
    sizes = MESHES[mesh]
    # A (embed, mlp) kernel: embed over fsdp, mlp over tensor.
    full, shard = r["kernel_shape"], r["kernel_shard_shape"]
    assert shard == [full[0] // sizes["fsdp"], full[1] // sizes["tensor"]]
    assert r["adam_mu_shard_shape"] == shard, "Adam's first moment must be sharded like its parameter"
    assert r["largest_shard_fraction"] <= 0.5, "a large parameter sits whole on every device"


@pytest.mark.parametrize("target", ["8x1", "1x8", "single"])
def test_checkpoint_from_2x4_restores_on_other_meshes(results, target):
    r = results["restore"][target]
    assert r["max_diff"] == 0.0
    assert r["step"] == 1
    assert r["devices"] == (1 if target == "single" else 8)


# ------------------------------------------------------------------------------------ subprocess side


def _main(out: Path) -> None:
    import jax
    import jax.numpy as jnp

    from unclip_jax.training import checkpoint as ckpt_lib, sharding, stages, steps, trainer
    from unclip_jax.training.data import SyntheticData
    from unclip_jax.training.state import TrainState

    assert jax.device_count() == 8, jax.devices()
    config = prior_config()
    batch = next(SyntheticData("prior", config, seed=0))
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])

    def run(mesh_config, devices):
        mesh = sharding.make_mesh(mesh_config, devices)
        stage, tx, _, shardings = trainer.build(config, mesh)
        frozen = stages.init_frozen(stage, config, jax.random.key(1), mesh)
        state = TrainState(**trainer.initial_state(config, stage, tx, shardings))
        init = jax.device_get(state.params)
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        step = steps.jit_train_step(stage, tx, config, mesh, TrainState(**shardings), batch_sh,
                                    jax.tree.map(lambda x: x.sharding, frozen))
        state, metrics = step(state, sharding.shard_batch(batch, mesh), frozen)
        return mesh, shardings, state, float(metrics["loss"]), init

    results = {"meshes": {}, "restore": {}}
    _, _, single, single_loss, single_init = run(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    results["single"] = {"loss": single_loss}
    for name, mesh_config in MESHES.items():
        mesh, shardings, state, loss, init = run(mesh_config, jax.devices())
        kernel = state.params["prior"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
        adam = state.opt_state.inner_states["train"].inner_state[1][0]   # multi_transform > chain(clip, adamw)
        mu = adam.mu["prior"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
        shard_fraction = max(np.prod(x.sharding.shard_shape(x.shape)) / max(1, x.size)
                             for x in jax.tree.leaves(state.params) if x.size >= 1024)
        results["meshes"][name] = {
            "loss": loss, "init_max_diff": float(np.abs(flat(init) - flat(single_init)).max()),
            "params_max_diff": float(np.abs(flat(jax.device_get(state.params))
                                            - flat(jax.device_get(single.params))).max()),
            "ema_max_diff": float(np.abs(flat(jax.device_get(state.ema_params))
                                         - flat(jax.device_get(single.ema_params))).max()),
            "kernel_shape": list(kernel.shape), "kernel_shard_shape": list(kernel.sharding.shard_shape(kernel.shape)),
            "adam_mu_shard_shape": list(mu.sharding.shard_shape(mu.shape)),
            "largest_shard_fraction": float(shard_fraction),
        }
        if name == "2x4 data-fsdp":
            written = state

    ckpt = ckpt_lib.Checkpointer(out / "ckpt", config, async_save=True)
    ckpt.save(1, written.checkpointed(), {"kind": "synthetic", "index": 1})
    ckpt.close()
    expected = flat(jax.device_get(written.checkpointed()))
    targets = {"8x1": (dict(data=8, fsdp=1, tensor=1), jax.devices()),
               "1x8": (dict(data=1, fsdp=8, tensor=1), jax.devices()),
               "single": (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])}
    for name, (mesh_config, devices) in targets.items():
        mesh = sharding.make_mesh(mesh_config, devices)
        _, _, abstract, shardings = trainer.build(config, mesh)
        target = ckpt_lib.abstract_like(abstract, shardings)
        tree, data_state = ckpt_lib.Checkpointer(out / "ckpt", config).restore(target)
        results["restore"][name] = {"max_diff": float(np.abs(flat(jax.device_get(tree)) - expected).max()),
                                    "step": int(tree["step"]), "data": data_state,
                                    "devices": len(jax.tree.leaves(tree["params"])[0].sharding.device_set)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    del jnp


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
