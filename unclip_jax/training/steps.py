"""The jitted functions of training: the train step and the sample functions behind the image grids.

    step_fn = jit_train_step(stage, tx, config, mesh, state_shardings, batch_shardings, frozen_shardings)
    state, metrics = step_fn(state, batch, frozen)      # state is donated

One step = one optimiser update on the global batch: grad_accum_steps micro-batches (a lax.scan) whose
gradients are averaged, global-norm clipping and AdamW (state.make_optimizer), the EMA, and a guard: when the
loss or the gradient norm is not finite, params, optimiser state and EMA stay as they were (the step counter
still advances past the bad batch) and metrics["nonfinite"] says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import sampling
from unclip_jax.diffusion import scheduler as sch
from unclip_jax.training import losses
from unclip_jax.training.sharding import BATCH_AXES, replicated
from unclip_jax.training.state import TrainState, ema_update, learning_rate_schedule


def _micro_batches(batch: dict, accum: int, mesh) -> dict:
    """(B, ...) -> (accum, B / accum, ...), micro-batch j = rows j, j + accum, ...: every device keeps its own
    rows (rows are split over devices in contiguous blocks), so the reshape moves no data."""
    def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
    return jax.tree.map(split, batch)


def make_train_step(stage, tx: optax.GradientTransformation, config, mesh=None):
    """The pure step (state, batch, frozen) -> (state, metrics); `frozen` None means state.frozen."""
    accum = int(config.grad_accum_steps)
    schedule = learning_rate_schedule(config)
    ema_decay = float(config.ema_decay)

    def train_step(state: TrainState, batch: dict, frozen: dict | None = None):
        frozen = state.frozen if frozen is None else frozen
        key = state.key()
        grad_fn = jax.value_and_grad(lambda p, b, k: stage.loss(p, b, k, frozen), has_aux=True)
        if accum == 1:
            (loss, parts), grads = grad_fn(state.params, batch, key)
        else:
            def body(total, xs):
                i, mb = xs
                out = grad_fn(state.params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, total, out), None
            zeros = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[: x.shape[0] // accum], batch), key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), zeros)
            total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), _micro_batches(batch, accum, mesh)))
            (loss, parts), grads = jax.tree.map(lambda x: x / accum, total)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, state.step, ema_decay)

        def keep(new, old):  # the guard: a non-finite step changes nothing but the step counter
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params))
        metrics = {"loss": loss, **{f"loss/{k}": v for k, v in parts.items()}, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step), "nonfinite": jnp.logical_not(finite)}
        return new_state, metrics
    return train_step


def jit_train_step(stage, tx, config, mesh, state_shardings, batch_shardings, frozen_shardings):
    """The step jitted with explicit shardings in and out, the train state donated."""
    step = make_train_step(stage, tx, config, mesh)
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------- samples


def _with_null(text: sampling.TextConditioning, null: dict) -> sampling.TextConditioning:
    """[empty prompt x B; text]: the [uncond; cond] batch of classifier-free guidance."""
    def both(k, x):
        return jnp.concatenate([jnp.broadcast_to(null[k], x.shape).astype(x.dtype), x])
    return sampling.TextConditioning(both("embeds", text.embeds), both("hidden_states", text.hidden_states),
                                     both("mask", text.mask))


def make_sampler(stage, config):
    """A jitted fn(params, batch, frozen, key) -> dict of images in [0, 1] (decoder, upsamplers) or of
    scalars (prior: cosine similarity of sampled and true image embeddings; clip: retrieval top-1 among the
    sample rows). Uses the EMA params."""
    steps = int(config.sample_steps)
    scale = float(config.sample_guidance)
    guidance = scale > 1.0

    if stage.name == "clip":  # retrieval among the sample rows with the EMA towers
        def clip_fn(params, batch, frozen, key):
            loss, parts = losses.clip_loss(stage.modules["text_encoder"], stage.modules["image_encoder"], params, batch)
            return {"loss": loss, "top1": parts["accuracy"]}
        return jax.jit(clip_fn)

    if stage.name == "prior":
        stages = sampling.Stages(prior=stage.modules["prior"], prior_scheduler=stage.scheduler)

        def prior_fn(params, batch, frozen, key):
            text = stage.text(batch, frozen)
            if guidance:
                text = _with_null(text, frozen["null_text"])
            z = sampling.sample_prior(stages, params, text, key, scale, num_steps=steps, guidance=guidance)
            target = batch["image_embeds"]
            cos = jnp.sum(z * target, -1) / (jnp.linalg.norm(z, axis=-1) * jnp.linalg.norm(target, axis=-1) + 1e-8)
            return {"cosine_to_target": jnp.mean(cos)}
        return jax.jit(prior_fn)

    if stage.name == "decoder":
        stages = sampling.Stages(decoder=stage.modules["decoder"], text_proj=stage.modules["text_proj"],
                                 decoder_scheduler=stage.scheduler)

        def decoder_fn(params, batch, frozen, key):
            text = stage.text(batch, frozen)
            if guidance:
                text = _with_null(text, frozen["null_text"])
            cond = sampling.decoder_conditioning(stages, params, batch["image_embeds"].astype(jnp.float32), text,
                                                 guidance=guidance)
            x = sampling.sample_decoder(stages, params, cond, key, scale, num_steps=steps, guidance=guidance)
            return {"target": sampling.to_unit_range(batch["image"]), "sample": sampling.to_unit_range(x)}
        return jax.jit(decoder_fn)

    (name,) = stage.components
    unet = stage.modules[name]
    sched_state = sch.create_state(stage.scheduler)

    def upsampler_fn(params, batch, frozen, key):
        hi = batch["image"].astype(jnp.float32)
        k_deg, k_x, k_steps = jax.random.split(key, 3)
        low = batch.get("low_res")
        low = losses.degrade_for_upsampler(k_deg, hi, stage.loss_config) if low is None else low.astype(jnp.float32)
        cond = sampling.upsample(low, hi.shape[1])
        x = jax.random.normal(k_x, hi.shape, jnp.float32)
        model = lambda x, t: unet.apply({"params": params[name]}, jnp.concatenate([x, cond], -1), t).astype(jnp.float32)
        x = sampling.denoise(model, sched_state, stage.scheduler, x, steps, k_steps)
        return {"low_res": sampling.to_unit_range(cond), "sample": sampling.to_unit_range(x),
                "target": sampling.to_unit_range(hi)}
    return jax.jit(upsampler_fn)
