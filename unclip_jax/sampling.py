"""unCLIP sampling as pure, jittable functions (paper section 2; Karlo's sampler).

    prior:       text -> CLIP image embedding          (sample_prior)
    decoder:     image embedding + text -> 64x64 image (decoder_conditioning, sample_decoder)
    super-res:   64x64 -> 256x256                       (sample_super_res)
    everything:  text_to_image, image_variation

Every stage is one `lax.scan` over (step index, t, prev_t[, step noise]) with the latents as the
carry, so compile time does not grow with the step count. Guidance scales and DDIM's eta are traced
arrays: sweeping them never recompiles. What is static: the modules (`Stages`), step counts, the
number of images per prompt, and whether classifier-free guidance runs at all.

Randomness: all of it comes from `rng` unless given explicitly in `Noise`: starting latents and the
per-step noise (num_steps, *latent_shape), the noise added at step i (unused at the final step). With
explicit noise a run is reproducible across frameworks; with the same rng, the same images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from unclip_jax.diffusion import scheduler as sch

Params = Any


@dataclasses.dataclass(frozen=True)
class Stages:
    """The static half of an unCLIP stack: Flax modules and scheduler configs (hashable; jit-static).

    Any module may be None when a function does not need it (the variation pipeline has no prior).
    """
    prior: Any = None
    text_proj: Any = None
    decoder: Any = None
    super_res_first: Any = None
    super_res_last: Any = None
    text_encoder: Any = None
    image_encoder: Any = None
    prior_scheduler: sch.SchedulerConfig = sch.PRIOR
    decoder_scheduler: sch.SchedulerConfig = sch.DECODER
    super_res_scheduler: sch.SchedulerConfig = sch.SUPER_RES
    # None (Karlo): super-resolution starts from pure noise at t = 999. A timestep t0: it starts at the first
    # inference timestep <= t0 from the upsampled image noised to that level (SDEdit, Meng et al. 2022), which
    # keeps a small or briefly trained upsampler from drifting in colour at high noise (the demo model's setting).
    super_res_start_timestep: int | None = None

    def need(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this computation needs the component(s) {missing}, which this pipeline does not have")


@flax.struct.dataclass
class TextConditioning:
    """CLIP text encoder outputs for a batch of prompts.

    embeds: (B, D) projected pooled embedding; hidden_states: (B, L, D) last hidden state;
    mask: (B, L) bool, True for real tokens.
    """
    embeds: jax.Array
    hidden_states: jax.Array
    mask: jax.Array

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]


@flax.struct.dataclass
class Noise:
    """Optional explicit noise; any field left None is drawn from the rng.

    *_latents: the starting x_T of a stage, (B, D) for the prior, (B, H, W, C) NHWC for images.
    *_step_noise: (num_steps, *latent_shape); entry i is added at step i (the last entry is unused).
    """
    prior_latents: jax.Array | None = None
    prior_step_noise: jax.Array | None = None
    decoder_latents: jax.Array | None = None
    decoder_step_noise: jax.Array | None = None
    super_res_latents: jax.Array | None = None
    super_res_step_noise: jax.Array | None = None


@flax.struct.dataclass
class Tokens:
    """Tokenised prompts: input_ids (B, L) int32 and attention_mask (B, L), 1/True for real tokens."""
    input_ids: jax.Array
    attention_mask: jax.Array


def encode_text(stages: Stages, params: dict, input_ids: jax.Array, attention_mask: jax.Array) -> TextConditioning:
    """Token ids (B, L) and mask (B, L) -> TextConditioning through the CLIP text tower."""
    stages.need("text_encoder")
    out = stages.text_encoder.apply({"params": params["text_encoder"]}, input_ids, attention_mask)
    return TextConditioning(out.text_embeds.astype(jnp.float32), out.last_hidden_state.astype(jnp.float32),
                            attention_mask.astype(bool))


def as_conditioning(stages: Stages, params: dict, text):
    """Tokens -> TextConditioning through the text tower; TextConditioning (or None) passes through."""
    if isinstance(text, Tokens):
        return encode_text(stages, params, text.input_ids, text.attention_mask)
    return text


def _repeat(cond: TextConditioning, n: int) -> TextConditioning:
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0), cond) if n > 1 else cond


def _with_uncond(cond: TextConditioning, uncond: TextConditioning) -> TextConditioning:
    """[uncond; cond], the unconditional rows broadcast to cond's batch (they are all the empty prompt)."""
    b = cond.batch_size
    if uncond.batch_size not in (1, b):
        raise ValueError(f"the unconditional text has batch {uncond.batch_size}; expected 1 or {b}")
    return jax.tree_util.tree_map(
        lambda u, c: jnp.concatenate([jnp.broadcast_to(u, (b,) + u.shape[1:]).astype(c.dtype), c]), uncond, cond)


def _check(name: str, x, expected: tuple[int, ...]) -> jax.Array:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(expected)}")
    return jnp.asarray(x, jnp.float32)


def _start(latents, key, shape, name):
    return jax.random.normal(key, shape, jnp.float32) if latents is None else _check(name, latents, shape)


def denoise(model_fn: Callable, state: sch.SchedulerState, config: sch.SchedulerConfig, x: jax.Array,
            num_steps: int, key: jax.Array, step_noise: jax.Array | None = None, *, first: int = 0,
            last: int | None = None, eta: jax.Array | None = None) -> jax.Array:
    """Runs steps [first, last) of an n-step schedule as one lax.scan; model_fn(x, t) -> model output.

    With eta None the update is unCLIP's ancestral step (`scheduler.step`); with eta (traced) it is
    DDIM's. Step noise comes from `step_noise[i]` or, when None, from fold_in(key, i).
    """
    t_all, prev_all = sch.step_pairs(num_steps)
    last = num_steps if last is None else last
    if step_noise is not None:
        step_noise = _check("step noise", step_noise, (num_steps,) + x.shape)[first:last]

    def body(x, inputs):
        i, t, prev_t, noise = inputs
        if noise is None:
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        out = model_fn(x, t)
        if eta is None:
            return sch.step(state, config, out, t, prev_t, x, noise), None
        return sch.ddim_step(state, config, out, t, prev_t, x, noise, eta), None

    xs = (jnp.arange(first, last), jnp.asarray(t_all[first:last]), jnp.asarray(prev_all[first:last]), step_noise)
    x, _ = lax.scan(body, x, xs)
    return x


def _guided(out: jax.Array, scale: jax.Array, channels: int | None = None) -> jax.Array:
    """[uncond; cond] -> u + s (c - u). With `channels`, only the first `channels` (eps) are guided and
    the rest (the learned variance) come from the conditional half."""
    u, c = jnp.split(out, 2, axis=0)
    if channels is None:
        return u + scale * (c - u)
    eps = u[..., :channels] + scale * (c[..., :channels] - u[..., :channels])
    return jnp.concatenate([eps, c[..., channels:]], axis=-1)


# -------------------------------------------------------------------------------------------- prior


def sample_prior(stages: Stages, params: dict, text: TextConditioning, key: jax.Array, guidance_scale,
                 *, num_steps: int = 25, guidance: bool = True, latents=None, step_noise=None) -> jax.Array:
    """Text -> CLIP image embeddings (B, D), un-normalised (x * clip_std + clip_mean).

    text: the conditioning for B images, already [uncond; cond] (2B rows) when guidance is on.
    """
    stages.need("prior")
    prior, p = stages.prior, params["prior"]
    b = text.batch_size // 2 if guidance else text.batch_size
    dim = prior.config.embedding_dim
    k_start, k_steps = jax.random.split(key)
    x = _start(latents, k_start, (b, dim), "prior_latents")
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def model_fn(x, t):
        xin = jnp.concatenate([x, x]) if guidance else x
        out = prior.apply({"params": p}, xin, t, proj_embedding=text.embeds, encoder_hidden_states=text.hidden_states,
                          attention_mask=text.mask).astype(jnp.float32)
        return _guided(out, scale) if guidance else out

    x = denoise(model_fn, sch.create_state(stages.prior_scheduler), stages.prior_scheduler, x, num_steps, k_steps,
                step_noise)
    return prior.apply({"params": p}, x, method=prior.unnormalize)


# ------------------------------------------------------------------------------------------ decoder


@flax.struct.dataclass
class DecoderConditioning:
    """What the decoder attends to: context (B', K + L, C), class_labels (B', T), mask (B', K + L)."""
    context: jax.Array
    class_labels: jax.Array
    mask: jax.Array


def decoder_conditioning(stages: Stages, params: dict, image_embeddings: jax.Array, text: TextConditioning,
                         *, guidance: bool = True) -> DecoderConditioning:
    """text_proj: image embeddings (B, D) + text ([uncond; cond] under guidance) -> decoder conditioning."""
    stages.need("text_proj")
    tp = stages.text_proj
    context, class_labels = tp.apply({"params": params["text_proj"]}, image_embeddings, text.embeds,
                                     text.hidden_states, guidance)
    k = tp.config.clip_extra_context_tokens
    mask = jnp.concatenate([jnp.ones((text.batch_size, k), bool), text.mask], axis=1)
    return DecoderConditioning(context, class_labels, mask)


def sample_decoder(stages: Stages, params: dict, cond: DecoderConditioning, key: jax.Array, guidance_scale,
                   *, num_steps: int = 25, guidance: bool = True, latents=None, step_noise=None,
                   eta=None) -> jax.Array:
    """Decoder conditioning -> 64x64 images (B, H, W, 3) in [-1, 1] (NHWC).

    eta None: unCLIP's ancestral sampler with learned variance; eta given (traced): DDIM with that eta
    (0 = deterministic, used with DDIM-inverted latents to reconstruct an image, paper 3.1).
    """
    stages.need("decoder")
    dec, p = stages.decoder, params["decoder"]
    b = cond.context.shape[0] // 2 if guidance else cond.context.shape[0]
    size, channels = dec.config.sample_size, dec.config.in_channels
    k_start, k_steps = jax.random.split(key)
    x = _start(latents, k_start, (b, size, size, channels), "decoder_latents")
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def model_fn(x, t):
        xin = jnp.concatenate([x, x]) if guidance else x
        out = dec.apply({"params": p}, xin, t, encoder_hidden_states=cond.context, class_labels=cond.class_labels,
                        attention_mask=cond.mask).astype(jnp.float32)
        return _guided(out, scale, channels) if guidance else out

    x = denoise(model_fn, sch.create_state(stages.decoder_scheduler), stages.decoder_scheduler, x, num_steps,
                k_steps, step_noise, eta=None if eta is None else jnp.asarray(eta, jnp.float32))
    return jnp.clip(x, -1.0, 1.0)


# ---------------------------------------------------------------------------------------- super-res


def upsample(images: jax.Array, size: int) -> jax.Array:
    """(B, h, w, C) -> (B, size, size, C), antialiased bicubic (torch's interpolate(bicubic, antialias=True))."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="cubic", antialias=True)


def sample_super_res(stages: Stages, params: dict, images: jax.Array, key: jax.Array, *, num_steps: int = 7,
                     latents=None, step_noise=None) -> jax.Array:
    """64x64 images in [-1, 1] -> super-resolved images (B, S, S, 3) in [-1, 1] (not clipped).

    `super_res_first` runs every step but the last, `super_res_last` the last one (two scans' worth of
    code, never a lax.cond that would carry both parameter trees through every step).
    """
    stages.need("super_res_first", "super_res_last")
    first, last = stages.super_res_first, stages.super_res_last
    size = first.config.sample_size
    channels = first.config.in_channels // 2
    b = images.shape[0]
    k_start, k_steps = jax.random.split(key)
    x = _start(latents, k_start, (b, size, size, channels), "super_res_latents")
    cond = upsample(images.astype(jnp.float32), size)
    state, config = sch.create_state(stages.super_res_scheduler), stages.super_res_scheduler
    start = 0
    if stages.super_res_start_timestep is not None:  # SDEdit: the noised upsampled image, part-way down
        ts = sch.timesteps(num_steps, config.num_train_timesteps)
        start = min(int(np.argmax(ts <= stages.super_res_start_timestep)), num_steps - 1)
        x = sch.q_sample(state, cond, jnp.full((b,), ts[start], jnp.int32), x)

    def model_fn(module, p):
        return lambda x, t: module.apply({"params": p}, jnp.concatenate([x, cond], axis=-1), t).astype(jnp.float32)

    x = denoise(model_fn(first, params["super_res_first"]), state, config, x, num_steps, k_steps, step_noise,
                first=start, last=num_steps - 1)
    return denoise(model_fn(last, params["super_res_last"]), state, config, x, num_steps, k_steps, step_noise,
                   first=num_steps - 1)


def to_unit_range(images: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 1], clipped (the pipelines' output convention)."""
    return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0)


# ------------------------------------------------------------------------------------ whole pipelines


def _constrain(x, sharding):
    return x if sharding is None else lax.with_sharding_constraint(x, sharding)


def text_to_image(stages: Stages, params: dict, text: TextConditioning, uncond: TextConditioning | None,
                  rng: jax.Array, prior_guidance_scale=4.0, decoder_guidance_scale=8.0, *,
                  num_images_per_prompt: int = 1, prior_num_inference_steps: int = 25,
                  decoder_num_inference_steps: int = 25, super_res_num_inference_steps: int = 7,
                  guidance: bool = True, noise: Noise | None = None, batch_sharding=None,
                  return_intermediates: bool = False):
    """The whole text-to-image computation: prior, text_proj, decoder, upsample, super-res.

    text: TextConditioning (or Tokens, encoded here) of P prompts; uncond: that of the empty prompt
    (batch 1 or P), needed when guidance is on. Returns images (P * num_images_per_prompt, S, S, 3) in [0, 1]; with
    return_intermediates, also a dict with image_embeddings and the 64x64 decoder output.
    Pure and jittable; `batch_sharding` (static) places the batch dimension (data parallelism).
    """
    text, uncond = as_conditioning(stages, params, text), as_conditioning(stages, params, uncond)
    if guidance and uncond is None:
        raise ValueError("classifier-free guidance needs the unconditional (empty prompt) text conditioning")
    noise = noise or Noise()
    k_prior, k_dec, k_sr = jax.random.split(rng, 3)
    cond = _repeat(text, num_images_per_prompt)
    full = _with_uncond(cond, uncond) if guidance else cond
    full = jax.tree_util.tree_map(lambda x: _constrain(x, batch_sharding), full)
    image_embeddings = sample_prior(stages, params, full, k_prior, prior_guidance_scale,
                                    num_steps=prior_num_inference_steps, guidance=guidance,
                                    latents=noise.prior_latents, step_noise=noise.prior_step_noise)
    images = decode_image_embeddings(stages, params, image_embeddings, full, k_dec, k_sr, decoder_guidance_scale,
                                     decoder_num_inference_steps=decoder_num_inference_steps,
                                     super_res_num_inference_steps=super_res_num_inference_steps,
                                     guidance=guidance, noise=noise, batch_sharding=batch_sharding,
                                     return_intermediates=return_intermediates)
    if return_intermediates:
        images, extra = images
        return images, {"image_embeddings": image_embeddings, **extra}
    return images


def decode_image_embeddings(stages: Stages, params: dict, image_embeddings, text: TextConditioning, k_dec, k_sr,
                            decoder_guidance_scale, *, decoder_num_inference_steps: int = 25,
                            super_res_num_inference_steps: int = 7, guidance: bool = True,
                            noise: Noise | None = None, batch_sharding=None, decoder_eta=None,
                            return_intermediates: bool = False):
    """Image embeddings (B, D) + text ([uncond; cond] under guidance) -> images (B, S, S, 3) in [0, 1]."""
    noise = noise or Noise()
    image_embeddings = _constrain(image_embeddings, batch_sharding)
    cond = decoder_conditioning(stages, params, image_embeddings, text, guidance=guidance)
    small = sample_decoder(stages, params, cond, k_dec, decoder_guidance_scale, num_steps=decoder_num_inference_steps,
                           guidance=guidance, latents=noise.decoder_latents, step_noise=noise.decoder_step_noise,
                           eta=decoder_eta)
    small = _constrain(small, batch_sharding)
    big = sample_super_res(stages, params, small, k_sr, num_steps=super_res_num_inference_steps,
                           latents=noise.super_res_latents, step_noise=noise.super_res_step_noise)
    images = to_unit_range(big)
    if return_intermediates:
        return images, {"decoder_output": small}
    return images


def image_variation(stages: Stages, params: dict, image_embeddings: jax.Array, text: TextConditioning,
                    uncond: TextConditioning | None, rng: jax.Array, decoder_guidance_scale=8.0, *,
                    num_images_per_prompt: int = 1, decoder_num_inference_steps: int = 25,
                    super_res_num_inference_steps: int = 7, guidance: bool = True, noise: Noise | None = None,
                    batch_sharding=None):
    """CLIP image embeddings (B, D) -> variations (B * num_images_per_prompt, S, S, 3) in [0, 1].

    text is the empty prompt's conditioning (batch 1 or B), as Karlo's variation pipeline uses;
    guidance contrasts the image embedding with the learned null embedding.
    """
    text, uncond = as_conditioning(stages, params, text), as_conditioning(stages, params, uncond)
    if guidance and uncond is None:
        raise ValueError("classifier-free guidance needs the unconditional (empty prompt) text conditioning")
    b = image_embeddings.shape[0]
    text = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:]), text)
    cond = _repeat(text, num_images_per_prompt)
    full = _with_uncond(cond, uncond) if guidance else cond
    full = jax.tree_util.tree_map(lambda x: _constrain(x, batch_sharding), full)
    embeddings = jnp.repeat(jnp.asarray(image_embeddings, jnp.float32), num_images_per_prompt, axis=0)
    _, k_dec, k_sr = jax.random.split(rng, 3)
    return decode_image_embeddings(stages, params, embeddings, full, k_dec, k_sr, decoder_guidance_scale,
                                   decoder_num_inference_steps=decoder_num_inference_steps,
                                   super_res_num_inference_steps=super_res_num_inference_steps,
                                   guidance=guidance, noise=noise, batch_sharding=batch_sharding)
