"""The paper's manipulations beyond reconstruction, as pure, jittable functions (one batch per row):

    interpolate_images   two images' (z_i, x_T) -> a row (section 3.2, figure 4)
    interpolate_prompts  two prompts -> a row through their text embeddings and the prior
    text_diff            an image's latent and two captions -> a row (section 3.3, figure 5)
    best_of_n_prior      N prior samples per prompt, the one closest to the text kept (section 2.2)
    inpaint              a masked region regenerated in the decoder, RePaint-style, then super-res

Static: the modules, step counts, row lengths, N, whether guidance runs. Traced: guidance scales,
eta, theta values, every array. The images of a row share their noise (x_T when it is not inverted,
DDIM and super-res noise: one key repeated per row, see `ddim.decode`), so that they differ only by
the interpolated quantity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from unclip_jax import sampling
from unclip_jax.diffusion import scheduler as sch
from unclip_jax.manipulations.ddim import (DEFAULT_INVERSION_STEPS, DEFAULT_MAX_TIMESTEP, BipartiteLatent, decode,
                                           decoder_model, super_resolve)
from unclip_jax.manipulations.slerp import normalize, slerp
from unclip_jax.sampling import Stages, TextConditioning


def _row_noise(key, shape, n):
    """One standard normal draw of `shape`, repeated n times: (n, *shape)."""
    return jnp.broadcast_to(jax.random.normal(key, (1,) + tuple(shape), jnp.float32), (n,) + tuple(shape))


def _row_keys(key: jax.Array, n: int) -> jax.Array:
    """One key repeated for the n images of a row: they share their DDIM and super-res noise."""
    return jnp.broadcast_to(key, (n,))


def _decoder_shape(stages: Stages) -> tuple[int, int, int]:
    c = stages.decoder.config
    return c.sample_size, c.sample_size, c.in_channels


# ------------------------------------------------------------------------------------ interpolation


def interpolate_text(text_a: TextConditioning, text_b: TextConditioning, thetas) -> TextConditioning:
    """Two prompts' conditioning (1 row each) -> a row of N: embeddings slerped, hidden states lerped,
    attention masks the union; each end exactly its prompt's conditioning."""
    thetas = jnp.asarray(thetas, jnp.float32)
    embeds = slerp(text_a.embeds[0], text_b.embeds[0], thetas)
    th = thetas[:, None, None]
    a, b = text_a.hidden_states[0], text_b.hidden_states[0]
    hidden = jnp.where(a == b, a, (1 - th) * a + th * b)
    hidden = jnp.where(th == 0, a, jnp.where(th == 1, b, hidden))
    ma, mb = text_a.mask[0], text_b.mask[0]
    mask = jnp.where(thetas[:, None] == 0, ma, jnp.where(thetas[:, None] == 1, mb, ma | mb))
    return TextConditioning(embeds, hidden, mask)


def interpolation_rows(stages: Stages, image_embeddings_a, image_embeddings_b, thetas, text_a: TextConditioning,
                       text_b: TextConditioning, key: jax.Array, latents_a=None, latents_b=None):
    """What a row between two images decodes: (z_i (N, D), text (N rows), x_T (N, S, S, C), decode key).

    z_i = slerp(z_i1, z_i2, theta); the captions interpolated alike (`interpolate_text`); x_T slerped
    between the inverted latents when both are given, else one random draw (from fold_in(key, 1)) for
    the whole row.
    """
    thetas = jnp.asarray(thetas, jnp.float32)
    n = thetas.shape[0]
    z = slerp(jnp.reshape(image_embeddings_a, (-1,)), jnp.reshape(image_embeddings_b, (-1,)), thetas)
    text = interpolate_text(text_a, text_b, thetas)
    # The row decodes with `key` itself, as a reconstruction does: inverted ends then equal
    # `reconstruct(latent, rng=key)` exactly, super-res included.
    k_latents, k_decode = jax.random.fold_in(key, 1), key
    shape = _decoder_shape(stages)
    if (latents_a is None) != (latents_b is None):
        raise ValueError("give both inverted latents (latents_a and latents_b) or neither (one random x_T per row)")
    if latents_a is None:
        x_t = _row_noise(k_latents, shape, n)
    else:
        x_t = slerp(jnp.reshape(latents_a, shape), jnp.reshape(latents_b, shape), thetas, ndim=3)
    return z, text, x_t, k_decode


def interpolate_images(stages: Stages, params: dict, image_embeddings_a, image_embeddings_b, thetas,
                       text_a: TextConditioning, text_b: TextConditioning, uncond: TextConditioning | None,
                       key: jax.Array, guidance_scale=8.0, eta=0.0, *, latents_a=None, latents_b=None,
                       num_steps: int = DEFAULT_INVERSION_STEPS, max_timestep: int = DEFAULT_MAX_TIMESTEP,
                       guidance: bool = True, clip_sample: bool = True, super_res_num_steps: int = 7):
    """A row between two images (paper section 3.2): z_i = slerp(z_i1, z_i2, theta) for each theta.

    image_embeddings_a, _b: (D,) or (1, D); thetas: (N,) in [0, 1]; text_a, text_b: the captions the
    images were inverted with (1 row each; the empty prompt when there is none), interpolated alike.
    x_T: slerp(latents_a, latents_b, theta) when both inverted latents ((S, S, C) or (1, S, S, C)) are
    given, so that the ends reconstruct the inputs; otherwise one random x_T from `key` for the whole
    row (figure 4). Returns (images (N, S', S', 3) in [0, 1], 64x64 stage (N, S, S, C) in [-1, 1],
    image embeddings (N, D)).
    """
    z, text, x_t, k_decode = interpolation_rows(stages, image_embeddings_a, image_embeddings_b, thetas, text_a,
                                                text_b, key, latents_a, latents_b)
    images, small = decode(stages, params, z, text, uncond, x_t, _row_keys(k_decode, z.shape[0]), guidance_scale, eta,
                           num_steps=num_steps, max_timestep=max_timestep, guidance=guidance, clip_sample=clip_sample,
                           super_res_num_steps=super_res_num_steps)
    return images, small, z


def prompt_interpolation_rows(stages: Stages, params: dict, text_a: TextConditioning, text_b: TextConditioning,
                              thetas, uncond: TextConditioning | None, key: jax.Array, prior_guidance_scale=4.0, *,
                              prior_num_steps: int = 25, guidance: bool = True):
    """What a row between two prompts decodes: (z_i (N, D), text (N rows), x_T (N, S, S, C), decode key).

    The text conditioning is interpolated (`interpolate_text`) and the prior maps each interpolate to
    an image embedding, all from one draw of prior noise; x_T is one random draw for the row.
    """
    stages.need("prior")
    thetas = jnp.asarray(thetas, jnp.float32)
    n = thetas.shape[0]
    text = interpolate_text(text_a, text_b, thetas)
    full = sampling._with_uncond(text, uncond) if guidance else text
    k_prior, k_start, k_steps, k_latents, k_decode = jax.random.split(key, 5)
    dim = stages.prior.config.embedding_dim
    z = sampling.sample_prior(stages, params, full, k_prior, prior_guidance_scale, num_steps=prior_num_steps,
                              guidance=guidance, latents=_row_noise(k_start, (dim,), n),
                              step_noise=jnp.swapaxes(_row_noise(k_steps, (prior_num_steps, dim), n), 0, 1))
    return z, text, _row_noise(k_latents, _decoder_shape(stages), n), k_decode


def interpolate_prompts(stages: Stages, params: dict, text_a: TextConditioning, text_b: TextConditioning, thetas,
                        uncond: TextConditioning | None, key: jax.Array, prior_guidance_scale=4.0,
                        decoder_guidance_scale=8.0, eta=0.0, *, prior_num_steps: int = 25, num_steps: int = 25,
                        max_timestep: int = DEFAULT_MAX_TIMESTEP, guidance: bool = True, clip_sample: bool = True,
                        super_res_num_steps: int = 7):
    """A row between two prompts through their text embeddings (`prompt_interpolation_rows`), decoded
    with DDIM from one x_T; the whole row shares its prior, decoder and super-res noise.

    text_a, text_b: 1 row each; thetas (N,). Returns (images, 64x64 stage, image embeddings (N, D)).
    """
    z, text, x_t, k_decode = prompt_interpolation_rows(stages, params, text_a, text_b, thetas, uncond, key,
                                                       prior_guidance_scale, prior_num_steps=prior_num_steps,
                                                       guidance=guidance)
    images, small = decode(stages, params, z, text, uncond, x_t, _row_keys(k_decode, z.shape[0]),
                           decoder_guidance_scale, eta, num_steps=num_steps, max_timestep=max_timestep,
                           guidance=guidance, clip_sample=clip_sample, super_res_num_steps=super_res_num_steps)
    return images, small, z


# ---------------------------------------------------------------------------------------- text diffs


def text_diff_embeddings(image_embeddings, target_text_embeds, base_text_embeds, thetas) -> jax.Array:
    """z = slerp(z_i, z_d, theta), z_d = normalise(z_t(target) - z_t(base)) (paper section 3.3).

    image_embeddings: (B, D); target/base text embeddings: (B, D) or (1, D); thetas: (N,).
    Returns (B, N, D). z_d is scaled to |z_i| (the paper's embeddings are unit vectors; Karlo's decoder
    takes CLIP's unnormalised projections), so the rotation keeps the embedding's norm.
    """
    z_i = jnp.asarray(image_embeddings, jnp.float32)
    diff = jnp.asarray(target_text_embeds, jnp.float32) - jnp.asarray(base_text_embeds, jnp.float32)
    z_d = normalize(diff) * jnp.linalg.norm(z_i, axis=-1, keepdims=True)
    return slerp(z_i[:, None, :], z_d[:, None, :], jnp.asarray(thetas, jnp.float32)[None, :])


def text_diff_rows(latent: BipartiteLatent, target_text_embeds, base_text_embeds, thetas):
    """What a text-diff row decodes: (z (B * N, D), text (B * N rows), x_T (B * N, S, S, C)), image by
    image, theta by theta; each image's x_T and caption repeated along its row."""
    n = jnp.asarray(thetas).shape[0]
    z = text_diff_embeddings(latent.image_embeddings, target_text_embeds, base_text_embeds, thetas)
    repeat = lambda x: jnp.repeat(x, n, axis=0)
    return z.reshape((-1, z.shape[-1])), jax.tree_util.tree_map(repeat, latent.text), repeat(latent.latents)


def text_diff(stages: Stages, params: dict, latent: BipartiteLatent, target_text_embeds, base_text_embeds, thetas,
              uncond: TextConditioning | None, key: jax.Array, eta=0.0, *, clip_sample: bool = False,
              super_res_num_steps: int = 7):
    """Text diffs (paper section 3.3, figure 5): each image's latent decoded from slerp(z_i, z_d, theta)
    with its inverted x_T (and its caption) fixed along the row; theta = 0 is the reconstruction.

    latent: B images; target/base_text_embeds: (B, D) or (1, D), CLIP text embeddings (z_t) of the new
    caption and of the current one (or "a photo"); thetas: (N,) in [0, 1].
    Returns (images (B * N, S', S', 3) in [0, 1], image by image, 64x64 stage, embeddings (B * N, D)).
    """
    z, text, x_t = text_diff_rows(latent, target_text_embeds, base_text_embeds, thetas)
    images, small = decode(stages, params, z, text, uncond, x_t, _row_keys(key, z.shape[0]), latent.guidance_scale,
                           eta, num_steps=latent.num_steps, max_timestep=latent.max_timestep, guidance=latent.guidance,
                           clip_sample=clip_sample, super_res_num_steps=super_res_num_steps)
    return images, small, z


# ------------------------------------------------------------------------------------------ best of N


def best_of_n_prior(stages: Stages, params: dict, text: TextConditioning, uncond: TextConditioning | None,
                    key: jax.Array, guidance_scale=4.0, *, n: int = 2, num_steps: int = 25, guidance: bool = True):
    """N prior samples per prompt; keeps the one with the highest dot product with the text embedding
    (paper section 2.2: "generating two samples of z_i and selecting the one with a higher dot product
    with z_t"), on unit vectors as in the paper (CLIP's cosine similarity).

    text: B rows (one image each). Returns (best (B, D), scores (B, n), candidates (B, n, D)); the
    embeddings un-normalised as the prior returns them.
    """
    if n < 1:
        raise ValueError(f"best-of-N needs N >= 1 candidates, got {n}")
    b = text.batch_size
    cond = sampling._repeat(text, n)
    full = sampling._with_uncond(cond, uncond) if guidance else cond
    candidates = sampling.sample_prior(stages, params, full, key, guidance_scale, num_steps=num_steps,
                                       guidance=guidance).reshape((b, n, -1))
    scores = jnp.einsum("bnd,bd->bn", normalize(candidates), normalize(text.embeds))
    best = jnp.take_along_axis(candidates, jnp.argmax(scores, axis=1)[:, None, None], axis=1)[:, 0]
    return best, scores, candidates


def text_to_image_best_of_n(stages: Stages, params: dict, text: TextConditioning, uncond: TextConditioning | None,
                            rng: jax.Array, prior_guidance_scale=4.0, decoder_guidance_scale=8.0, *, n: int = 2,
                            num_images_per_prompt: int = 1, prior_num_inference_steps: int = 25,
                            decoder_num_inference_steps: int = 25, super_res_num_inference_steps: int = 7,
                            guidance: bool = True):
    """`sampling.text_to_image` with a best-of-N prior: (images (P * K, S', S', 3) in [0, 1],
    {"image_embeddings": (P * K, D), "scores": (P * K, n), "candidates": (P * K, n, D)}).
    With n = 1 it draws exactly what text_to_image draws from the same rng."""
    k_prior, k_dec, k_sr = jax.random.split(rng, 3)
    cond = sampling._repeat(text, num_images_per_prompt)
    best, scores, candidates = best_of_n_prior(stages, params, cond, uncond, k_prior, prior_guidance_scale, n=n,
                                               num_steps=prior_num_inference_steps, guidance=guidance)
    full = sampling._with_uncond(cond, uncond) if guidance else cond
    images = sampling.decode_image_embeddings(stages, params, best, full, k_dec, k_sr, decoder_guidance_scale,
                                              decoder_num_inference_steps=decoder_num_inference_steps,
                                              super_res_num_inference_steps=super_res_num_inference_steps,
                                              guidance=guidance)
    return images, {"image_embeddings": best, "scores": scores, "candidates": candidates}


# ------------------------------------------------------------------------------------------- inpaint


def repaint(model_fn, state: sch.SchedulerState, config: sch.SchedulerConfig, x: jax.Array, pairs, key: jax.Array,
            known: jax.Array, mask: jax.Array, resample: int = 1, *, first_index: int = 0) -> jax.Array:
    """Ancestral sampling over `pairs` = (t, prev_t) arrays with the known pixels pasted in after each step
    (RePaint, Lugmayr et al. 2022): x_prev = mask * step(x_t) + (1 - mask) * q(known at prev_t).

    Each step is tried `resample` times (static), going back from prev_t to t with fresh noise,
    x_t = sqrt(abar_t / abar_prev) x_prev + sqrt(1 - abar_t / abar_prev) z, between tries, so that the
    generated region harmonises with the known one. mask: 1 where pixels are generated, 0 where kept
    (broadcasts against x). At the last step (prev_t = -1) the known pixels are pasted exactly.
    """
    mask = jnp.asarray(mask, jnp.float32)
    known = jnp.asarray(known, jnp.float32)
    ts, prevs = pairs

    def step(x, inputs):
        i, t, prev = inputs
        abar_t, abar_prev = sch.alpha_bar(state, t), sch.alpha_bar(state, prev)
        ratio = abar_t / abar_prev

        def attempt(u, x):
            k_step, k_known, k_back = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), u), 3)
            normal = lambda k: jax.random.normal(k, x.shape, jnp.float32)
            x_prev = sch.step(state, config, model_fn(x, t), t, prev, x, normal(k_step))
            known_prev = jnp.sqrt(abar_prev) * known + jnp.sqrt(1 - abar_prev) * normal(k_known)
            x_prev = mask * x_prev + (1 - mask) * known_prev
            back = jnp.sqrt(ratio) * x_prev + jnp.sqrt(1 - ratio) * normal(k_back)
            return jnp.where(u < resample - 1, back, x_prev)

        return lax.fori_loop(0, resample, attempt, x), None

    idx = jnp.arange(ts.shape[0]) + first_index
    x, _ = lax.scan(step, jnp.asarray(x, jnp.float32), (idx, jnp.asarray(ts), jnp.asarray(prevs)))
    return x


def inpaint(stages: Stages, params: dict, images: jax.Array, mask: jax.Array, image_embeddings: jax.Array,
            text: TextConditioning, uncond: TextConditioning | None, key: jax.Array, guidance_scale=8.0, *,
            num_steps: int = 25, resample: int = 5, guidance: bool = True, full_images: jax.Array | None = None,
            full_mask: jax.Array | None = None, super_res_num_steps: int = 7):
    """Regenerates the masked region of 64x64 images consistently with the rest and with z_i
    (RePaint-style resampling in the decoder), then super-resolves, keeping the known pixels there too.

    images: (B, S, S, C) in [-1, 1] at the decoder's size; mask: (B, S, S, 1) (or (B, S, S)), 1 where
    the image is regenerated, 0 where it is kept; image_embeddings: (B, D) (from the prior for a
    prompt, or the vision tower); text: B rows (or 1); uncond: the empty prompt, for guidance.
    full_images (B, S', S', 3) in [-1, 1] and full_mask (B, S', S', 1) at the super-res size: when
    given, the known pixels are pasted in at every super-res step too, so they come out as the input.
    Returns (images (B, S', S', 3) in [0, 1], 64x64 stage (B, S, S, C) in [-1, 1]).
    """
    if resample < 1:
        raise ValueError(f"resample must be >= 1 (tries per step), got {resample}")
    images = jnp.asarray(images, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim == 3:
        mask = mask[..., None]
    k_start, k_dec, k_sr = jax.random.split(key, 3)
    model_fn = decoder_model(stages, params, jnp.asarray(image_embeddings, jnp.float32), text, uncond,
                             guidance_scale, guidance=guidance)
    config = stages.decoder_scheduler
    x = jax.random.normal(k_start, images.shape, jnp.float32)
    small = repaint(model_fn, sch.create_state(config), config, x, sch.step_pairs(num_steps), k_dec, images, mask,
                    resample)
    small = jnp.clip(small, -1.0, 1.0)
    if full_images is None:
        return super_resolve(stages, params, small, k_sr, num_steps=super_res_num_steps), small
    return _super_res_inpaint(stages, params, small, k_sr, full_images, full_mask, super_res_num_steps), small


def _super_res_inpaint(stages: Stages, params: dict, small, key, known, mask, num_steps: int):
    """Karlo's super-res (super_res_first for all steps but the last) with the known pixels pasted in."""
    stages.need("super_res_first", "super_res_last")
    first, last = stages.super_res_first, stages.super_res_last
    size = first.config.sample_size
    b = small.shape[0]
    known = jnp.asarray(known, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim == 3:
        mask = mask[..., None]
    cond = sampling.upsample(small, size)
    config = stages.super_res_scheduler
    state = sch.create_state(config)
    k_start, k_steps = jax.random.split(key)
    x = jax.random.normal(k_start, (b, size, size, first.config.in_channels // 2), jnp.float32)

    def model_fn(module, p):
        return lambda x, t: module.apply({"params": p}, jnp.concatenate([x, cond], axis=-1), t).astype(jnp.float32)

    ts, prevs = sch.step_pairs(num_steps)
    x = repaint(model_fn(first, params["super_res_first"]), state, config, x, (ts[:-1], prevs[:-1]), k_steps, known,
                mask)
    x = repaint(model_fn(last, params["super_res_last"]), state, config, x, (ts[-1:], prevs[-1:]), k_steps, known,
                mask, first_index=num_steps - 1)
    return sampling.to_unit_range(x)
