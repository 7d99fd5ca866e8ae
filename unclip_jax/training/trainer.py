"""The training loop: one function for every stage of unCLIP.

    python -m unclip_jax.train --config configs/tiny.py:decoder --workdir /tmp/decoder
    # or, in Python:
    from unclip_jax.training.trainer import train
    train(config, workdir)

The workdir holds everything a run writes: checkpoints/ (Orbax; a run started on a workdir that has
checkpoints resumes from the latest), tensorboard/, metrics.jsonl, samples/ (PNG grids) and export/ (the EMA
weights in the diffusers layout, readable by unclip_jax.load_component and diffusers' from_pretrained).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import images as images_lib
from unclip_jax.training import checkpoint as ckpt_lib
from unclip_jax.training import config_lib, metrics as metrics_lib, sharding, stages as stages_lib, steps
from unclip_jax.training import state as state_lib
from unclip_jax.training.data import check_batch, local_batch_size, make_source

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN / inf loss or gradient (config.on_nonfinite, config.max_nonfinite)."""


class NonFiniteGuard:
    """The host side of the non-finite guard. The train step already left params, optimiser state and EMA
    untouched on a non-finite step; this says so, counts, and stops training when config.on_nonfinite is
    "stop" or after max_nonfinite bad steps in a row. The loop calls it one step late, so the host never
    waits on the step in flight."""

    def __init__(self, on_nonfinite: str, max_in_row: int, last_checkpoint=lambda: None):
        self.on_nonfinite, self.max_in_row, self.last_checkpoint = on_nonfinite, max_in_row, last_checkpoint
        self.in_row = self.total = 0

    def __call__(self, step: int, metrics: dict) -> None:
        if not bool(metrics["nonfinite"]):
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        what = (f"step {step}: loss {float(metrics['loss']):.4g}, gradient norm {float(metrics['grad_norm']):.4g} "
                "(not finite)")
        if self.on_nonfinite == "stop" or self.in_row >= self.max_in_row:
            why = ("on_nonfinite=stop" if self.on_nonfinite == "stop"
                   else f"{self.in_row} non-finite steps in a row, max_nonfinite={self.max_in_row}")
            msg = (f"{what}; stopping ({why}). The last checkpoint is step {self.last_checkpoint()}; check the "
                   "data and the learning rate, then run again to resume from it.")
            log.error(msg)
            raise NonFiniteLossError(msg)
        log.warning("%s: update skipped, parameters unchanged (%d in a row)", what, self.in_row)


def build(config, mesh):
    """Everything about the state that does not need its values: stage, optimiser, shapes, shardings."""
    stage = stages_lib.build_stage(config)
    shapes, logical = stage.abstract()
    param_sh = sharding.param_shardings(logical, shapes, mesh, config.sharding_rules)
    tx = state_lib.make_optimizer(config)
    abstract_opt = jax.eval_shape(tx.init, shapes)
    rep = sharding.replicated(mesh)
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes, "opt_state": abstract_opt,
                "ema_params": shapes, "rng": jax.ShapeDtypeStruct(key_shape, jnp.uint32)}
    shardings = {"step": rep, "params": param_sh,
                 "opt_state": sharding.like_params(abstract_opt, shapes, param_sh, mesh),
                 "ema_params": param_sh, "rng": rep}
    return stage, tx, abstract, shardings


def initial_state(config, stage, tx, shardings, make_source_fn=make_source) -> dict:
    """Step 0, every array created directly in its sharding: from scratch, one jit(init, out_shardings=...)
    makes params, optimiser state and EMA; from config.init_from, each tensor is placed as it is read."""
    k_init, k_run = jax.random.split(jax.random.key(config.seed))
    stats = {}
    from_data = config.clip_stats == "data" or (config.clip_stats == "auto" and not config.init_from)
    if stage.name == "prior" and from_data:
        mean, std = stages_lib.estimate_clip_stats(config, make_source_fn)
        stats = {"clip_mean": mean, "clip_std": std}
        log.info("prior: clip_mean / clip_std estimated from %d batches (|mean| %.3g, mean std %.3g)",
                 config.clip_stats_batches, float(np.abs(mean).mean()), float(std.mean()))

    def finish(params, stats):
        if stats:
            params = {**params, "prior": {**params["prior"], **stats}}
        return params, tx.init(params), jax.tree.map(jnp.copy, params)

    out_shardings = (shardings["params"], shardings["opt_state"], shardings["ema_params"])
    if config.init_from:
        log.info("initialising %s from %s", ", ".join(stage.components), config.init_from)
        loaded = stages_lib.load_trained(stage, config.init_from, shardings["params"])
        params, opt_state, ema = jax.jit(finish, out_shardings=out_shardings, donate_argnums=0)(loaded, stats)
    else:
        params, opt_state, ema = jax.jit(lambda k, stats: finish(stages_lib.init_trained(stage, k), stats),
                                         out_shardings=out_shardings)(k_init, stats)
    return {"step": jax.device_put(jnp.int32(0), shardings["step"]), "params": params, "opt_state": opt_state,
            "ema_params": ema, "rng": jax.device_put(jax.random.key_data(k_run), shardings["rng"])}


def train(config, workdir) -> dict:
    """Trains config.stage in `workdir` (resuming from its latest checkpoint); returns the last metrics."""
    config_lib.check(config)
    workdir = Path(workdir)
    t_start = time.perf_counter()

    # ----------------------------------------------------------------------------------------- devices
    mesh = sharding.make_mesh(config.mesh)
    log.info("%d devices (%s), %d host(s); mesh %s", jax.device_count(), jax.devices()[0].device_kind,
             jax.process_count(), dict(mesh.shape))
    micro = config.batch_size // config.grad_accum_steps
    if micro % sharding.batch_rows_divisor(mesh):
        raise ValueError(f"config: batch_size / grad_accum_steps = {micro} rows per micro-batch is not a multiple of "
                         f"data x fsdp = {sharding.batch_rows_divisor(mesh)} devices")

    # ---------------------------------------------------------------------------- model and state layout
    stage, tx, abstract, shardings = build(config, mesh)
    n_params = state_lib.count(abstract["params"])
    log.info("stage %s: training %s, %.2fM parameters", stage.name, ", ".join(stage.components), n_params / 1e6)
    frozen = stages_lib.init_frozen(stage, config, jax.random.key(config.seed + 1), mesh)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)

    # ------------------------------------------------------------------------- resume or initialise
    source = make_source(config, config.stage)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", config, keep=config.keep_checkpoints,
                                 async_save=config.async_checkpoints)
    if ckpt.latest_step() is not None:
        tree, data_state = ckpt.restore(ckpt_lib.abstract_like(abstract, shardings))
        source.set_state(data_state)
        log.info("resumed from step %d in %s", int(tree["step"]), workdir)
    else:
        tree = initial_state(config, stage, tx, shardings)
    in_state = bool(config.frozen_in_state)
    state = state_lib.TrainState(**tree, frozen=frozen if in_state else None)
    state_sh = state_lib.TrainState(**shardings, frozen=frozen_sh if in_state else None)

    # ------------------------------------------------------------------------------------ compile
    step = int(state.step)
    rows = local_batch_size(config)
    first = next(source) if step < config.total_steps else None
    if first is not None:
        check_batch(stage.name, first, config, rows)
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in (first or {}).items()}
    train_step = steps.jit_train_step(stage, tx, config, mesh, state_sh, batch_sh, None if in_state else frozen_sh)
    frozen_arg = None if in_state else frozen
    flops = None
    if first is not None:
        t0 = time.perf_counter()
        train_step = train_step.lower(state, sharding.shard_batch(first, mesh), frozen_arg).compile()
        flops = metrics_lib.compiled_flops(train_step, loop_trips=config.grad_accum_steps)
        log.info("train step compiled in %.1f s; %s per step per device", time.perf_counter() - t0,
                 f"{flops / 1e9:.3g} GFLOP" if flops else "FLOPs unknown")
    writer = metrics_lib.Writer(workdir)
    peak = metrics_lib.peak_flops()
    speed = metrics_lib.Speed(config.batch_size, flops, peak)
    sampler = steps.make_sampler(stage, config) if config.sample_every else None
    sample_batch = None if first is None else jax.tree.map(lambda x: x[: config.num_samples], first)
    preemption = ckpt_lib.PreemptionWatcher()

    # ---------------------------------------------------------------------------------------- loop
    guard = NonFiniteGuard(config.on_nonfinite, config.max_nonfinite, ckpt.latest_step)

    last_metrics: dict = {}
    pending = None
    speed.reset(step)
    preempted = False
    try:
        while step < config.total_steps:
            batch = first if first is not None else next(source)
            first = None
            state, m = train_step(state, sharding.shard_batch(batch, mesh), frozen_arg)
            step += 1
            if pending is not None:
                guard(*pending)
            pending = (step, m)

            if step % config.log_every == 0 or step == config.total_steps:
                guard(*pending)
                pending = None
                last_metrics = {k: float(v) for k, v in jax.device_get(m).items()}
                last_metrics.update(speed.measure(step), skipped=guard.total)
                writer.scalars(step, {k: v for k, v in last_metrics.items() if k != "nonfinite"})
                elapsed = time.perf_counter() - t_start
                log.info(metrics_lib.progress_line(step, config.total_steps, last_metrics, elapsed))

            if preemption.reached(step):
                ckpt.save(step, state.checkpointed(), source.get_state(), force=True)
                preempted = True
                log.warning("preempted: checkpoint of step %d saved; exiting. Run the same command to resume.", step)
                break
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                ckpt.save(step, state.checkpointed(), source.get_state())
            if sampler is not None and (step % config.sample_every == 0 or step == config.total_steps):
                # (kept in the state, the frozen arrays were donated with it: use the state's copy)
                write_samples(sampler, state, sample_batch, state.frozen if in_state else frozen, mesh, step,
                              workdir, writer)
                speed.reset(step)
            if config.export_every and step % config.export_every == 0 and step != config.total_steps:
                stage.export(state.ema_params, workdir / "export")
        if pending is not None:
            guard(*pending)
    finally:
        ckpt.close()
        writer.close()
        preemption.restore()
        if hasattr(source, "close"):  # the data pipeline's prefetch threads
            source.close()

    if not preempted and step >= config.total_steps:
        paths = stage.export(state.ema_params, workdir / "export")
        if paths:
            log.info("exported EMA weights: %s", ", ".join(str(p) for p in paths))
    last_metrics.update(step=step, preempted=preempted)
    return last_metrics


def write_samples(sampler, state, sample_batch, frozen, mesh, step: int, workdir: Path, writer) -> None:
    """Decoder / upsamplers: a PNG grid (rows: [low-res,] sample, target) in samples/ and TensorBoard.
    Prior: the cosine similarity of sampled and true image embeddings, as a scalar."""
    batch = sample_batch
    if jax.process_count() > 1:  # every host draws host 0's rows
        from jax.experimental import multihost_utils
        batch = multihost_utils.broadcast_one_to_all(batch)
    rep = sharding.replicated(mesh)
    batch = jax.tree.map(lambda x: jax.device_put(np.asarray(x), rep), batch)
    out = jax.device_get(sampler(state.ema_params, batch, frozen, jax.random.key(step)))
    if "sample" not in out:
        writer.scalars(step, {f"samples/{k}": v for k, v in out.items()})
        log.info("step %d samples: %s", step, ", ".join(f"{k} {float(v):.4f}" for k, v in out.items()))
        return
    rows = [out[k] for k in ("low_res", "sample", "target") if k in out]
    n = rows[0].shape[0]
    picture = images_lib.grid(np.concatenate(rows), cols=n)
    if jax.process_index() == 0:
        folder = workdir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"step_{step:08d}.png")
    writer.image(step, "samples", np.asarray(picture) / 255.0)
