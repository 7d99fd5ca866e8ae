"""The training objectives of unCLIP's three stages (paper section 2), as pure functions of params and a batch.

Each returns (loss, parts): the scalar that is differentiated and a dict of named float32 scalars for the logs.
Timesteps are uniform on the 1000-step training schedule; noise is standard normal; everything that is
random comes from one key.

    prior       x0-prediction MSE on normalised CLIP image embeddings (2.2, L_prior); text dropped -> ""
    decoder     eps MSE + vb_weight * L_vlb, learned-range variance with the mean stopped (Improved DDPM
                3.1); CLIP embedding -> learned null embedding, text -> "" (2.1, classifier-free guidance)
    upsampler   eps MSE given the degraded, re-upsampled low-resolution image on the input channels (2.1)
    clip        CLIP's symmetric contrastive loss (Radford et al. 2021) with a learned temperature
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unclip_jax.data.degrade import degrade_jax
from unclip_jax.diffusion import scheduler as sch
from unclip_jax.sampling import TextConditioning, upsample

Params = Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The hyperparameters of the objectives (static under jit)."""
    num_train_timesteps: int = 1000
    text_drop: float = 0.1
    image_embed_drop: float = 0.1
    vb_weight: float = 0.001
    upsample_factor: int = 4
    degradation: str = "blur"
    prediction_type: str = "epsilon"   # decoder: what the model's first channels predict (the MSE's target)
    loss_weighting: str = "none"       # decoder: none | clipped_snr (see decoder_loss)
    snr_gamma: float = 5.0

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        return cls(num_train_timesteps=config.num_train_timesteps, text_drop=float(config.text_drop),
                   image_embed_drop=float(config.image_embed_drop), vb_weight=float(config.vb_weight),
                   upsample_factor=int(config.upsample_factor), degradation=config.degradation,
                   prediction_type=str(config.prediction_type), loss_weighting=str(config.loss_weighting),
                   snr_gamma=float(config.snr_gamma))


def _noised(sched: sch.SchedulerState, cfg: LossConfig, key, x0):
    """t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4)."""
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, cfg.num_train_timesteps)
    noise = jax.random.normal(kn, x0.shape, jnp.float32)
    return t, noise, sch.q_sample(sched, x0, t, noise)


def drop_text(key, text: TextConditioning, null: TextConditioning, p: float) -> TextConditioning:
    """Replaces each example's text by the empty prompt's encoding with probability p."""
    if p <= 0:
        return text
    drop = jax.random.bernoulli(key, p, (text.embeds.shape[0],))

    def pick(x, n):
        d = drop.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(d, jnp.broadcast_to(n.astype(x.dtype), x.shape), x)
    return TextConditioning(pick(text.embeds, null.embeds), pick(text.hidden_states, null.hidden_states),
                            pick(text.mask, null.mask))


def prior_loss(prior, params: Params, text: TextConditioning, image_embeds, key, *, sched, cfg: LossConfig,
               null_text: TextConditioning):
    """L_prior = E ||f(z_t, t, y) - z||^2 with z = (image_embeds - clip_mean) / clip_std (paper 2.2).

    clip_mean / clip_std are statistics, not trained: the target must not move with them.
    text: (B, D) embeds, (B, L, D) hidden states, (B, L) mask; image_embeds (B, D).
    """
    k_drop, k_noise, k_dropout = jax.random.split(key, 3)
    stats = jax.lax.stop_gradient(params)
    x0 = prior.apply({"params": stats}, image_embeds.astype(jnp.float32), method=prior.normalize)
    t, _, x_t = _noised(sched, cfg, k_noise, x0)
    text = drop_text(k_drop, text, null_text, cfg.text_drop)
    pred = prior.apply({"params": params}, x_t, t, proj_embedding=text.embeds, encoder_hidden_states=text.hidden_states,
                       attention_mask=text.mask, deterministic=False, rngs={"dropout": k_dropout})
    mse = jnp.mean((pred.astype(jnp.float32) - x0) ** 2)
    return mse, {"mse": mse}


def decoder_loss(decoder, text_proj, params: Params, images, image_embeds, text: TextConditioning, key, *, sched,
                 cfg: LossConfig, null_text: TextConditioning):
    """L_hybrid = ||eps - eps_theta||^2 + vb_weight * L_vlb (Nichol & Dhariwal 2021, 3.1), paper 2.1's decoder;
    with cfg.prediction_type "sample" the MSE is ||x0 - x0_theta||^2 (the model predicts x0; L_vlb alike), with
    "v_prediction" ||v - v_theta||^2, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022; in x0 terms
    the x0 error weighted by SNR_t + 1), L_vlb's mean from the x0 it implies.

    cfg.loss_weighting "clipped_snr" weighs each example's error, in x0 terms, by clip(SNR_t, 1, snr_gamma) where
    SNR_t = abar_t / (1 - abar_t): the eps MSE is the x0 MSE times SNR_t, so it neglects the high noise levels
    (where the layout and colours are decided), and the x0 MSE neglects the low ones (where the edges are: a
    small decoder trained on it draws every shape as a round blob). The clip keeps the x0 weight (truncated SNR,
    Salimans & Ho 2022) at high noise and caps the low-noise weight (Min-SNR, Hang et al. 2023). "none": the plain
    MSE of the prediction type. L_vlb is not reweighted: with the MSE up to snr_gamma times larger, the learned
    variance gets relatively less of the gradient. (Training the demo decoder on from its weights at learning
    rate 5e-4 left the learned variance too large and the samples noisy, with this weighting or without it;
    watch the vb term and the sample grids when fine-tuning.)

    params: {"decoder": ..., "text_proj": ...}; images (B, S, S, 3) in [-1, 1]; image_embeds (B, D).
    The CLIP image embedding becomes text_proj's learned null embedding with probability image_embed_drop,
    the text the empty prompt with probability text_drop, independently.
    """
    k_img, k_txt, k_noise, k_dropout = jax.random.split(key, 4)
    null = params["text_proj"]["learned_classifier_free_guidance_embeddings"]
    image_embeds = image_embeds.astype(jnp.float32)
    if cfg.image_embed_drop > 0:
        drop = jax.random.bernoulli(k_img, cfg.image_embed_drop, (image_embeds.shape[0], 1))
        image_embeds = jnp.where(drop, null.astype(jnp.float32)[None], image_embeds)
    text = drop_text(k_txt, text, null_text, cfg.text_drop)
    context, class_labels = text_proj.apply({"params": params["text_proj"]}, image_embeds, text.embeds,
                                            text.hidden_states, False)
    k = context.shape[1] - text.mask.shape[1]
    mask = jnp.concatenate([jnp.ones((text.mask.shape[0], k), bool), text.mask.astype(bool)], axis=1)

    x0 = images.astype(jnp.float32)
    t, noise, x_t = _noised(sched, cfg, k_noise, x0)
    out = decoder.apply({"params": params["decoder"]}, x_t, t, encoder_hidden_states=context,
                        class_labels=class_labels, attention_mask=mask, deterministic=False,
                        rngs={"dropout": k_dropout}).astype(jnp.float32)
    c = x0.shape[-1]
    pred, v = out[..., :c], out[..., c:]
    if cfg.prediction_type == "sample":
        per_example = jnp.mean((pred - x0) ** 2, axis=(1, 2, 3))
        vb = jnp.mean(sch.vb_loss(sched, x0, x_t, t, None, v, x0_pred=pred))
    elif cfg.prediction_type == "v_prediction":
        per_example = jnp.mean((pred - sch.velocity(sched, x0, t, noise)) ** 2, axis=(1, 2, 3))
        vb = jnp.mean(sch.vb_loss(sched, x0, x_t, t, None, v, x0_pred=sch.x0_from_velocity(sched, x_t, t, pred)))
    else:
        per_example = jnp.mean((pred - noise) ** 2, axis=(1, 2, 3))
        vb = jnp.mean(sch.vb_loss(sched, x0, x_t, t, pred, v))
    mse = jnp.mean(per_example)
    if cfg.loss_weighting == "none":
        return mse + cfg.vb_weight * vb, {"mse": mse, "vb": vb}
    weighted = jnp.mean(per_example * snr_weights(sched, t, cfg))
    return weighted + cfg.vb_weight * vb, {"mse": mse, "weighted_mse": weighted, "vb": vb}


def snr_weights(sched: sch.SchedulerState, t, cfg: LossConfig) -> jax.Array:
    """(B,) multipliers of the per-example MSE for cfg.loss_weighting "clipped_snr": clip(SNR_t, 1, snr_gamma) on
    the x0 error, i.e. that over SNR_t on the eps error (eps error = SNR_t x0 error) and over SNR_t + 1 on the
    v error, float32."""
    abar = sch.alpha_bar(sched, t).astype(jnp.float32)
    snr = abar / (1.0 - abar)
    w = jnp.clip(snr, 1.0, cfg.snr_gamma)
    if cfg.prediction_type == "v_prediction":   # v error^2 = (SNR_t + 1) x0 error^2
        return w / (snr + 1.0)
    return w if cfg.prediction_type == "sample" else w / snr


def degrade_for_upsampler(key, images, cfg: LossConfig):
    """High-res crops (B, C, C, 3) -> degraded low-res (B, C/f, C/f, 3): blur (64->256) or BSR (256->1024).

    The same code as the data pipeline's host-side degradation (unclip_jax.data.degrade), so a batch degraded
    on the host (`low_res`) and one degraded here come from the same distribution."""
    return degrade_jax(key, images, kind=cfg.degradation, factor=cfg.upsample_factor)


def upsampler_loss(unet, params: Params, images, low_res, key, *, sched, cfg: LossConfig):
    """||eps - eps_theta(concat(x_t, upsample(low_res)), t)||^2 on random crops (paper 2.1, upsamplers).

    images: (B, C, C, 3) high-res crops in [-1, 1]; low_res: (B, C/f, C/f, 3) or None (degraded here).
    The conditioning is re-upsampled as at inference (antialiased bicubic, `sampling.upsample`).
    """
    k_deg, k_noise, k_dropout = jax.random.split(key, 3)
    x0 = images.astype(jnp.float32)
    if low_res is None:
        low_res = degrade_for_upsampler(k_deg, x0, cfg)
    cond = upsample(low_res.astype(jnp.float32), x0.shape[1])
    t, noise, x_t = _noised(sched, cfg, k_noise, x0)
    out = unet.apply({"params": params}, jnp.concatenate([x_t, cond], axis=-1), t, deterministic=False,
                     rngs={"dropout": k_dropout}).astype(jnp.float32)
    mse = jnp.mean((out - noise) ** 2)
    return mse, {"mse": mse}


MAX_LOGIT_SCALE = 4.6052  # log(100): CLIP clips its learned temperature at 1 / 100


def clip_loss(text_model, image_model, params: Params, batch: dict):
    """Symmetric InfoNCE over the global batch: cross-entropy of image -> text and text -> image similarities.

    params: {"text_encoder", "image_encoder", "logit_scale" ()}; batch: input_ids (B, L), attention_mask (B, L),
    pixel_values (B, P, P, 3). Rows whose token ids are identical are all positives of each other (targets spread
    evenly over them), so a repeated caption is not pushed away from its own images.
    """
    mask = batch["attention_mask"].astype(bool)
    ids = jnp.where(mask, batch["input_ids"], -1)
    text = text_model.apply({"params": params["text_encoder"]}, batch["input_ids"], mask).text_embeds
    image = image_model.apply({"params": params["image_encoder"]}, batch["pixel_values"]).image_embeds

    def unit(x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)
    scale = jnp.exp(jnp.minimum(params["logit_scale"].astype(jnp.float32), MAX_LOGIT_SCALE))
    logits = scale * unit(image) @ unit(text).T                              # (B images, B texts)
    same = jnp.all(ids[:, None] == ids[None], -1).astype(jnp.float32)       # same caption, symmetric
    targets = same / same.sum(-1, keepdims=True)
    image_to_text = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    text_to_image = jnp.mean(optax.softmax_cross_entropy(logits.T, targets))
    hit = same[jnp.arange(logits.shape[0]), jnp.argmax(logits, -1)]          # the top text is a right caption
    return (image_to_text + text_to_image) / 2, {"image_to_text": image_to_text, "text_to_image": text_to_image,
                                                 "accuracy": jnp.mean(hit), "logit_scale": scale}
