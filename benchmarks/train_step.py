r"""Train-step speed of one stage: compile time, step time, examples/s, FLOPs (XLA's cost analysis) and MFU.

    python benchmarks/train_step.py --config configs/tiny.py:decoder
    python benchmarks/train_step.py --config configs/karlo_decoder.py --config.text_encoder=None \
        --config.batch_size=32 --config.remat=True --steps 20 --json out.json
    python benchmarks/train_step.py --config configs/karlo_decoder.py --config.text_encoder=None \
        --config.batch_size=1 --flops_only          # XLA's FLOP count of a Karlo-size step, no weights allocated

It times exactly what the trainer runs: the same state layout, the same jitted step with donated state, on
synthetic batches already on the devices (input feeding is #5's benchmark, not this one). FLOPs are per
device and per step as XLA counts them (rematerialised work included); MFU = FLOPs / step time / the device's
dense bf16 peak (unclip_jax.training.metrics.PEAK_FLOPS), "n/a" where the peak is unknown (CPUs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/*.py[:arg]).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "Compile from abstract shapes and report XLA's FLOP count "
                                "only: nothing is allocated, so Karlo-size steps can be counted on a laptop.")
flags.mark_flags_as_required(["config"])


def measure(config, steps: int) -> dict:
    import jax
    import numpy as np

    from unclip_jax.training import config_lib, metrics, sharding, stages, trainer
    from unclip_jax.training import steps as steps_lib
    from unclip_jax.training.data import make_source
    from unclip_jax.training.state import TrainState, count

    config_lib.check(config)
    config.clip_stats = "keep"
    mesh = sharding.make_mesh(config.mesh)
    stage, tx, abstract, shardings = trainer.build(config, mesh)
    frozen = stages.init_frozen(stage, config, jax.random.key(1), mesh)
    state = TrainState(**trainer.initial_state(config, stage, tx, shardings))
    batch = next(make_source(config, config.stage))
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    step = steps_lib.jit_train_step(stage, tx, config, mesh, TrainState(**shardings), batch_sh,
                                    jax.tree.map(lambda x: x.sharding, frozen))
    batch = sharding.shard_batch(batch, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    flops = metrics.compiled_flops(compiled, loop_trips=config.grad_accum_steps)
    peak = metrics.peak_flops()

    state, m = compiled(state, batch, frozen)           # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    return {
        "stage": config.stage, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "mesh": dict(mesh.shape), "params_m": count(abstract["params"]) / 1e6, "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps, "compute_dtype": config.compute_dtype, "remat": config.remat,
        "compile_s": compile_s, "step_s": step_s, "step_s_min": float(min(times)),
        "examples_per_s": config.batch_size / step_s,
        "gflop_per_step_per_device": flops / 1e9 if flops else None,
        "tflops_per_device": flops / step_s / 1e12 if flops else None,
        "mfu": flops / step_s / peak if flops and peak else None,
        "loss": float(m["loss"]),
    }


def count_flops(config) -> dict:
    """Lowers and compiles the train step from ShapeDtypeStructs: FLOPs per step without any weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unclip_jax.models import abstract_params
    from unclip_jax.training import config_lib, metrics, sharding, trainer
    from unclip_jax.training import steps as steps_lib
    from unclip_jax.training.data import SyntheticData
    from unclip_jax.training.state import TrainState, count

    config_lib.check(config)
    mesh = sharding.make_mesh(config.mesh)
    stage, tx, abstract, shardings = trainer.build(config, mesh)
    rep = sharding.replicated(mesh)
    L, D, Dt = config.text_length, config.clip_dim, config.text_hidden_dim
    frozen = {"null_text": {"embeds": jax.ShapeDtypeStruct((D,), jnp.float32, sharding=rep),
                            "hidden_states": jax.ShapeDtypeStruct((L, Dt), jnp.float32, sharding=rep),
                            "mask": jax.ShapeDtypeStruct((L,), jnp.bool_, sharding=rep)}}
    if stage.text_encoder is not None:
        shapes, logical = abstract_params(stage.text_encoder)
        frozen["text_encoder"] = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                              sharding.param_shardings(logical, shapes, mesh, config.sharding_rules))
    if stage.name not in ("prior", "decoder"):
        frozen = {}
    sample = next(SyntheticData(config.stage, config))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
             for k, v in sample.items()}
    state = TrainState(**jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                      shardings))
    batch_sh = {k: v.sharding for k, v in batch.items()}
    step = steps_lib.jit_train_step(stage, tx, config, mesh, TrainState(**shardings), batch_sh,
                                    jax.tree.map(lambda x: x.sharding, frozen))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, frozen).compile()
    flops = metrics.compiled_flops(compiled, loop_trips=config.grad_accum_steps)
    del np
    return {"stage": config.stage, "params_m": count(abstract["params"]) / 1e6, "batch_size": config.batch_size,
            "devices": jax.device_count(), "compile_s": time.perf_counter() - t0,
            "gflop_per_step_per_device": flops / 1e9 if flops else None,
            "tflop_per_example": flops * jax.device_count() / config.batch_size / 1e12 if flops else None}


def main(argv) -> None:
    del argv
    if _FLOPS_ONLY.value:
        r = count_flops(_CONFIG.value)
        print(f"| {r['stage']} | {r['params_m']:.1f}M | {r['batch_size']} | {r['compile_s']:.0f} s | "
              f"{r['tflop_per_example']:.3g} TFLOP per example (train step) |")
        if _JSON.value:
            Path(_JSON.value).write_text(json.dumps(r, indent=1))
        return
    r = measure(_CONFIG.value, _STEPS.value)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    gflop = f"{r['gflop_per_step_per_device']:.3g}" if r["gflop_per_step_per_device"] else "?"
    print(f"| {r['stage']} | {r['params_m']:.2f}M | {r['batch_size']} | {r['compile_s']:.1f} s | "
          f"{1e3 * r['step_s']:.1f} ms | {r['examples_per_s']:.1f} | {gflop} | "
          f"{1e3 * (r['tflops_per_device'] or 0):.2f} | {mfu} |")
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    app.run(main)
