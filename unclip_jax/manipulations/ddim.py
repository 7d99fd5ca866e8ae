"""The bipartite latent (z_i, x_T) of paper section 3: DDIM inversion through the decoder and DDIM
decoding back, as pure, jittable functions.

    latent = ddim_invert(stages, params, images, z_i, text)            # x_T by DDIM inversion
    images, small = decode_latent(stages, params, latent, None, key, eta)  # eta = 0 reconstructs

Choices (what reconstructs best, measured in tests/test_manipulations.py):

* Inversion runs the decoder's DDIM step backwards, x_prev -> x_t, with the model evaluated at
  (x_prev, t): the one point the forward step evaluates at (x_t, t) that is known. That first-order
  approximation is DDIM inversion's only error and shrinks as the step count grows.
* Neither direction clips the predicted x0 by default (`clip_sample=False`): then decoding is the exact
  algebraic inverse of inversion, step for step, for any model; clipping is not invertible and, where
  a model's x0 leaves [-1, 1], breaks the reconstruction. eps is always the model's own
  (`use_clipped_model_output=False`, diffusers' default). Decoding a *random* x_T, which has nothing
  to retrace, clips as the scheduler config says (Karlo: yes).
* The schedule stops at `max_timestep` = 990 instead of 999: sqrt(alpha_bar) is 4.9e-5 at 999 (the
  capped last beta), so the first decoding step multiplies any eps mismatch by 2e4; at 990 it is 0.014
  (a factor 71), and x_T still carries only 1.4% of the image's amplitude against noise of std 1.
* Guidance: the latent remembers the scale it was inverted with and decoding uses the same one by
  default (a different model function retraces a different path). The default 1.0 is the paper's
  "conditioning on z_i" (the conditional model alone), the most exact inversion.

Measured: mean / max |reconstruction - input| of the 64x64 stage, pixels in [0, 1], on the tests'
random-weight stack (3 images; 4 / 8 / 16 / 32 / 64 steps):

    max_timestep 500                   .038/.20  .016/.15  .0060/.049  .0029/.018  .0013/.008
    max_timestep 500, guidance 4       .22/1.0   .14/.86   .058/.40    .026/.16    .010/.077
    max_timestep 500, x0 clipped       .041/.24  .038/.48  .041/.61    .066/.53    .081/.60   (no convergence)
    max_timestep 750                   .18/.94   .10/.60   .042/.24    .018/.11    .0072/.038
    max_timestep 990 or 999            about .49/1.0 at every step count

Random weights are no denoiser (their eps does not follow the probability-flow ODE), so DDIM's
first-order error grows with the sigma = sqrt((1 - abar) / abar) the schedule spans (1.0 at t = 500,
71 at 990, 2e4 at 999). With an exact denoiser (a Gaussian mixture's eps) the default schedule
reconstructs at 990 as well as at 999: mean error .075 / .036 / .019 (in [-1, 1]) at 10 / 25 / 50 steps.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from unclip_jax import sampling
from unclip_jax.diffusion import scheduler as sch
from unclip_jax.sampling import Stages, TextConditioning

DEFAULT_MAX_TIMESTEP = 990
DEFAULT_INVERSION_STEPS = 50


@flax.struct.dataclass
class BipartiteLatent:
    """An image as the decoder sees it (paper section 3): (z_i, x_T) plus what decoding must repeat.

    image_embeddings: (B, D) z_i, the CLIP image embedding.
    latents: (B, S, S, C) x_T at `max_timestep`, NHWC (S = the decoder's sample size, 64 for Karlo).
    text: the decoder's text conditioning during inversion (B rows; the empty prompt by default).
    guidance_scale: () the decoder guidance scale of the inversion (1 = conditional model only).
    num_steps, max_timestep, guidance: the DDIM schedule and whether guidance ran (static).
    """
    image_embeddings: jax.Array
    latents: jax.Array
    text: TextConditioning
    guidance_scale: jax.Array
    num_steps: int = flax.struct.field(pytree_node=False, default=DEFAULT_INVERSION_STEPS)
    max_timestep: int = flax.struct.field(pytree_node=False, default=DEFAULT_MAX_TIMESTEP)
    guidance: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index) -> "BipartiteLatent":
        """Rows of the batch: latent[1], latent[:2], latent[np.array([0, 0, 1])] (always keeps the batch axis)."""
        index = np.arange(self.batch_size)[index]
        index = np.atleast_1d(index)
        return jax.tree_util.tree_map(lambda x: x[index] if getattr(x, "ndim", 0) > 0 else x, self)

    @classmethod
    def concatenate(cls, latents) -> "BipartiteLatent":
        """Several latents inverted with the same settings -> one batch."""
        latents = list(latents)
        settings = lambda z: (z.num_steps, z.max_timestep, z.guidance, float(z.guidance_scale))
        first = latents[0]
        for other in latents[1:]:
            if settings(other) != settings(first):
                raise ValueError("these latents were inverted with different settings (num_steps, max_timestep, "
                                 f"guidance, guidance_scale): {settings(first)} and {settings(other)}; "
                                 "invert them alike")
        return jax.tree_util.tree_map(lambda *xs: xs[0] if xs[0].ndim == 0 else jnp.concatenate(xs), *latents)


# ------------------------------------------------------------------------------------------ schedule


def ddim_timesteps(num_steps: int, max_timestep: int = DEFAULT_MAX_TIMESTEP,
                   num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(t, prev_t), each (n,) int32, descending from max_timestep to 0, prev_t = -1 after the last.

    Karlo's spacing stretched to end at max_timestep: round(arange(n) * max_timestep / (n - 1))
    reversed (round half to even). max_timestep = 999 gives exactly `scheduler.step_pairs(n)`.
    """
    n, top = num_steps, max_timestep
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 1 <= top < num_train_timesteps:
        raise ValueError(f"max_timestep must be an int in [1, {num_train_timesteps - 1}], got {top!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= top + 1:
        raise ValueError(f"num_steps must be an int in [2, max_timestep + 1 = {top + 1}] (the first step is "
                         f"t = max_timestep, the last t = 0, none repeated), got {n!r}")
    t = (np.arange(n) * (top / (n - 1))).round()[::-1].astype(np.int32)
    return t, np.append(t[1:], np.int32(-1)).astype(np.int32)


# ------------------------------------------------------------------------------- decoder as a model


def broadcast_text(text: TextConditioning, batch: int, name: str = "text") -> TextConditioning:
    """A TextConditioning of batch 1 or `batch` -> batch `batch`."""
    if text.batch_size not in (1, batch):
        raise ValueError(f"{name} has batch {text.batch_size}; expected 1 or {batch}")
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), text)


def decoder_model(stages: Stages, params: dict, image_embeddings: jax.Array, text: TextConditioning,
                  uncond: TextConditioning | None, guidance_scale, *, guidance: bool):
    """The decoder as model_fn(x (B, S, S, C), t) -> [eps | v] (B, S, S, 2C), guided when `guidance`.

    image_embeddings: (B, D); text: B rows (or 1); uncond: the empty prompt (1 row), needed for guidance.
    """
    stages.need("decoder", "text_proj")
    b = image_embeddings.shape[0]
    text = broadcast_text(text, b)
    if guidance:
        if uncond is None:
            raise ValueError("classifier-free guidance needs the unconditional (empty prompt) text conditioning")
        text = sampling._with_uncond(text, uncond)
    cond = sampling.decoder_conditioning(stages, params, jnp.asarray(image_embeddings, jnp.float32), text,
                                         guidance=guidance)
    dec, p = stages.decoder, params["decoder"]
    channels = dec.config.in_channels
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def model_fn(x, t):
        xin = jnp.concatenate([x, x]) if guidance else x
        out = dec.apply({"params": p}, xin, t, encoder_hidden_states=cond.context, class_labels=cond.class_labels,
                        attention_mask=cond.mask).astype(jnp.float32)
        return sampling._guided(out, scale, channels) if guidance else out

    return model_fn


def _check_images(stages: Stages, images, name: str, batch: int | None = None) -> jax.Array:
    c = stages.decoder.config
    b = images.shape[0] if batch is None else batch
    expected = (b, c.sample_size, c.sample_size, c.in_channels)
    if tuple(images.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(images.shape)}; expected {expected} = (batch, decoder size, "
                         "decoder size, channels) NHWC")
    return jnp.asarray(images, jnp.float32)


# ------------------------------------------------------------------------------- inversion, decoding


def ddim_invert_with(model_fn, state: sch.SchedulerState, config: sch.SchedulerConfig, x0: jax.Array,
                     num_steps: int, max_timestep: int = DEFAULT_MAX_TIMESTEP) -> jax.Array:
    """DDIM inversion with any model_fn(x, t): x0 -> x_{max_timestep}, one lax.scan up the schedule.

    Step prev -> t (the reverse of decoding's t -> prev): eps = model_fn(x_prev, t), then
    x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps, x0_hat unclipped (`scheduler.ddim_invert_step`).
    """
    t_all, prev_all = ddim_timesteps(num_steps, max_timestep, config.num_train_timesteps)

    def body(x, pair):
        t, prev = pair
        return sch.ddim_invert_step(state, config, model_fn(x, t), prev, t, x, clip=False), None

    x, _ = lax.scan(body, jnp.asarray(x0, jnp.float32), (jnp.asarray(t_all[::-1]), jnp.asarray(prev_all[::-1])))
    return x


def normal(key: jax.Array, index, shape) -> jax.Array:
    """Standard normal noise of `shape` (B, ...) for step `index`: from one key for the whole batch
    (key of shape ()), or row by row from a batch of keys (B,) (rows with equal keys get equal noise)."""
    if key.shape == ():
        return jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)
    if key.shape != shape[:1]:
        raise ValueError(f"key has shape {key.shape}; expected () or ({shape[0]},) = one key per row")
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape[1:], jnp.float32))(key)


def ddim_sample_with(model_fn, state: sch.SchedulerState, config: sch.SchedulerConfig, x: jax.Array, key: jax.Array,
                     eta, num_steps: int, max_timestep: int = DEFAULT_MAX_TIMESTEP, *,
                     clip_sample: bool = False) -> jax.Array:
    """DDIM decoding with any model_fn(x, t): x_{max_timestep} (B, ...) -> x0, one lax.scan.

    eta: () or (B,), traced (0 = deterministic: the inverse of `ddim_invert_with`). key: one key, or
    one per row (B,): rows with the same key share their step noise (see `normal`). clip_sample
    (static): clip the predicted x0 to the config's range (not invertible; see the module docstring).
    """
    t_all, prev_all = ddim_timesteps(num_steps, max_timestep, config.num_train_timesteps)
    config = dataclasses.replace(config, clip_sample=clip_sample)
    eta = jnp.asarray(eta, jnp.float32)
    x = jnp.asarray(x, jnp.float32)

    def body(x, inputs):
        i, t, prev = inputs
        return sch.ddim_step(state, config, model_fn(x, t), t, prev, x, normal(key, i, x.shape), eta), None

    x, _ = lax.scan(body, x, (jnp.arange(num_steps), jnp.asarray(t_all), jnp.asarray(prev_all)))
    return x


def ddim_invert(stages: Stages, params: dict, images: jax.Array, image_embeddings: jax.Array,
                text: TextConditioning, uncond: TextConditioning | None = None, guidance_scale=1.0, *,
                num_steps: int = DEFAULT_INVERSION_STEPS, max_timestep: int = DEFAULT_MAX_TIMESTEP,
                guidance: bool = False) -> BipartiteLatent:
    """Images -> their bipartite latents (paper section 3): x_T by DDIM inversion through the decoder
    conditioned on z_i = image_embeddings and the text.

    images: (B, S, S, C) in [-1, 1] at the decoder's size; image_embeddings: (B, D) from the CLIP vision
    tower; text: the caption's conditioning (B rows or 1; the empty prompt when there is none);
    uncond: the empty prompt, for guidance (`guidance` static, guidance_scale traced).
    """
    images = _check_images(stages, images, "images")
    b = images.shape[0]
    image_embeddings = jnp.asarray(image_embeddings, jnp.float32)
    text = broadcast_text(text, b)
    model_fn = decoder_model(stages, params, image_embeddings, text, uncond, guidance_scale, guidance=guidance)
    config = stages.decoder_scheduler
    latents = ddim_invert_with(model_fn, sch.create_state(config), config, images, num_steps, max_timestep)
    return BipartiteLatent(image_embeddings, latents, text, jnp.asarray(guidance_scale, jnp.float32),
                           num_steps=num_steps, max_timestep=max_timestep, guidance=guidance)


def ddim_decode(stages: Stages, params: dict, image_embeddings: jax.Array, text: TextConditioning,
                uncond: TextConditioning | None, latents: jax.Array, key: jax.Array, guidance_scale, eta=0.0, *,
                num_steps: int = DEFAULT_INVERSION_STEPS, max_timestep: int = DEFAULT_MAX_TIMESTEP,
                guidance: bool = False, clip_sample: bool = False) -> jax.Array:
    """(z_i (B, D), x_T (B, S, S, C)) -> 64x64 images (B, S, S, C) in [-1, 1] by DDIM with eta (traced,
    () or (B,)); eta = 0 with an inverted x_T and the inversion's settings reconstructs the image.
    key: one, or one per row (B,) (equal keys, equal DDIM noise)."""
    latents = _check_images(stages, latents, "latents", image_embeddings.shape[0])
    model_fn = decoder_model(stages, params, image_embeddings, text, uncond, guidance_scale, guidance=guidance)
    config = stages.decoder_scheduler
    x = ddim_sample_with(model_fn, sch.create_state(config), config, latents, key, eta, num_steps, max_timestep,
                         clip_sample=clip_sample)
    return jnp.clip(x, -1.0, 1.0)


def split_keys(key: jax.Array, num: int = 2):
    """jax.random.split for one key or for a batch of keys (B,): a tuple of `num` keys of key's shape."""
    if key.shape == ():
        keys = jax.random.split(key, num)
        return tuple(keys[i] for i in range(num))
    keys = jax.vmap(lambda k: jax.random.split(k, num))(key)
    return tuple(keys[:, i] for i in range(num))


def super_resolve(stages: Stages, params: dict, small: jax.Array, key: jax.Array, *, num_steps: int = 7) -> jax.Array:
    """64x64 images in [-1, 1] -> full-size images (B, S', S', 3) in [0, 1] (Karlo's super-res stage).

    key: one for the batch, or one per row (B,): rows with equal keys get equal super-res noise, so
    that the images of a row differ only by what the manipulation changed.
    """
    if key.shape == ():
        return sampling.to_unit_range(sampling.sample_super_res(stages, params, small, key, num_steps=num_steps))
    stages.need("super_res_first", "super_res_last")
    sr = stages.super_res_first.config
    shape = (small.shape[0], sr.sample_size, sr.sample_size, sr.in_channels // 2)
    k_start, k_steps = split_keys(key)
    step_noise = jnp.stack([normal(k_steps, i, shape) for i in range(num_steps)])
    big = sampling.sample_super_res(stages, params, small, key[0], num_steps=num_steps,
                                    latents=normal(k_start, 0, shape), step_noise=step_noise)
    return sampling.to_unit_range(big)


def decode(stages: Stages, params: dict, image_embeddings: jax.Array, text: TextConditioning,
           uncond: TextConditioning | None, latents: jax.Array, key: jax.Array, guidance_scale, eta=0.0, *,
           num_steps: int = DEFAULT_INVERSION_STEPS, max_timestep: int = DEFAULT_MAX_TIMESTEP, guidance: bool = False,
           clip_sample: bool = False, super_res_num_steps: int = 7):
    """ddim_decode then super_resolve: -> (images (B, S', S', 3) in [0, 1], 64x64 stage (B, S, S, C) in [-1, 1]).

    key: one, or one per row (B,); each is split into the decoder's (DDIM noise, used when eta > 0) and
    the super-res stage's. A row of a manipulation passes one key repeated: its images share all noise.
    """
    k_dec, k_sr = split_keys(key)
    small = ddim_decode(stages, params, image_embeddings, text, uncond, latents, k_dec, guidance_scale, eta,
                        num_steps=num_steps, max_timestep=max_timestep, guidance=guidance, clip_sample=clip_sample)
    return super_resolve(stages, params, small, k_sr, num_steps=super_res_num_steps), small


def decode_latent(stages: Stages, params: dict, latent: BipartiteLatent, uncond: TextConditioning | None,
                  key: jax.Array, eta=0.0, *, clip_sample: bool = False, super_res_num_steps: int = 7):
    """A BipartiteLatent -> (images in [0, 1], 64x64 stage in [-1, 1]) with the settings it was inverted
    with; eta = 0 reconstructs, eta > 0 gives the paper's variations (section 3.1, figure 3)."""
    return decode(stages, params, latent.image_embeddings, latent.text, uncond, latent.latents, key,
                  latent.guidance_scale, eta, num_steps=latent.num_steps, max_timestep=latent.max_timestep,
                  guidance=latent.guidance, clip_sample=clip_sample, super_res_num_steps=super_res_num_steps)


def save_latent(path, latent: BipartiteLatent) -> None:
    """Writes a BipartiteLatent to an .npz file (arrays and settings); `load_latent` reads it back."""
    np.savez(path, image_embeddings=np.asarray(latent.image_embeddings), latents=np.asarray(latent.latents),
             text_embeds=np.asarray(latent.text.embeds), text_hidden_states=np.asarray(latent.text.hidden_states),
             text_mask=np.asarray(latent.text.mask), guidance_scale=np.asarray(latent.guidance_scale),
             num_steps=latent.num_steps, max_timestep=latent.max_timestep, guidance=latent.guidance)


def load_latent(path) -> BipartiteLatent:
    """Reads what `save_latent` wrote."""
    with np.load(path) as f:
        text = TextConditioning(jnp.asarray(f["text_embeds"]), jnp.asarray(f["text_hidden_states"]),
                                jnp.asarray(f["text_mask"], bool))
        return BipartiteLatent(jnp.asarray(f["image_embeddings"]), jnp.asarray(f["latents"]), text,
                               jnp.asarray(f["guidance_scale"], jnp.float32), num_steps=int(f["num_steps"]),
                               max_timestep=int(f["max_timestep"]), guidance=bool(f["guidance"]))
