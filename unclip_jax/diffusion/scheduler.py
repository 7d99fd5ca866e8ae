"""The unCLIP noise schedule, DDPM / DDIM steps and the Improved-DDPM training terms, as pure functions.

One schedule serves Karlo's three stages (prior, decoder, super-res): 1000 training steps of the
cosine ("squaredcos_cap_v2") schedule of Nichol & Dhariwal 2021, sampled on a respaced subset of
timesteps. `step` reproduces diffusers' `UnCLIPScheduler.step` to float32 rounding; `ddim_step` and
`ddim_invert_step` give the deterministic sampler and the inversion that the paper's image
manipulations need (unCLIP, Ramesh et al. 2022, section 3); `q_sample`, `posterior_mean_variance`
and `vb_loss` are the pieces of the decoder's hybrid loss (Nichol & Dhariwal 2021, section 3.1).

Conventions:
  * `config` (a `SchedulerConfig`) is static: close over it or pass it in `static_argnums`.
  * Timesteps are traced int32 values, so one compiled step serves every t of a schedule; a sampler
    `lax.scan`s `step` over `step_pairs(n)`. `t` may be a scalar or one timestep per example, (B,).
  * alpha_bar(t) = 1 for t < 0 ("before the first noising step") in every function here.
  * Arrays are channels-last (NHWC for images, (B, 768) for the prior); a learned-range model output
    carries [eps | v] on its LAST axis. Arithmetic is float32 whatever the input dtype.
  * Noise is an explicit argument with the sample's shape, so runs are reproducible across frameworks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SchedulerConfig", "SchedulerState", "PRIOR", "DECODER", "SUPER_RES", "create_state",
    "timesteps", "step_pairs", "alpha_bar", "predict_x0", "velocity", "x0_from_velocity", "step", "ddim_sigma",
    "ddim_step", "ddim_invert_step", "q_sample", "posterior_mean_variance", "normal_kl",
    "discretized_gaussian_log_likelihood", "learned_range_log_variance", "vb_loss",
]

# The options diffusers' UnCLIPScheduler implements, plus "v_prediction" (this project's: the name and meaning
# diffusers' DDPMScheduler gives it; UnCLIPScheduler cannot sample such a model); anything else would silently
# mean something else.
_SUPPORTED = {
    "beta_schedule": ("squaredcos_cap_v2",),
    "variance_type": ("fixed_small_log", "learned_range"),
    "prediction_type": ("epsilon", "sample", "v_prediction"),
}


# ------------------------------------------------------------------------------------ config & state


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Static scheduler settings; the fields and defaults of diffusers' `UnCLIPScheduler`.

    variance_type: "fixed_small_log" (posterior variance, Ho et al. 2020 eq. 7) or "learned_range"
        (the model's v interpolates log beta and log posterior variance, Nichol & Dhariwal eq. 15).
    prediction_type: "epsilon" (the model predicts the noise), "sample" (it predicts x0) or "v_prediction" (it
        predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, Salimans & Ho 2022: x0 = sqrt(abar_t) x_t -
        sqrt(1 - abar_t) v takes x_t as it is at low noise and v as x0 at high noise; not in diffusers'
        UnCLIPScheduler, whose two options each leave the small model one end to learn the hard way).
    clip_sample, clip_sample_range: clamp the predicted x0 to +-range before stepping.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    variance_type: str = "fixed_small_log"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self):
        for key, allowed in _SUPPORTED.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(
                    f"scheduler config {key}={value!r} is not supported; expected one of {allowed} "
                    "(the options of diffusers' UnCLIPScheduler)")
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
            raise ValueError(f"scheduler config num_train_timesteps={n!r} is not supported; expected an int >= 2")
        if not isinstance(self.clip_sample, (bool, np.bool_)):
            raise ValueError(f"scheduler config clip_sample={self.clip_sample!r} is not supported; expected true or false")
        r = self.clip_sample_range
        if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not (0 < r < math.inf):
            raise ValueError(f"scheduler config clip_sample_range={r!r} is not supported; expected a positive number")
        # Normalise JSON / numpy scalars so equal configs hash equally (the config is a jit static arg).
        object.__setattr__(self, "num_train_timesteps", int(n))
        object.__setattr__(self, "clip_sample", bool(self.clip_sample))
        object.__setattr__(self, "clip_sample_range", float(r))

    def to_diffusers(self) -> dict[str, Any]:
        """The scheduler_config.json entries diffusers' UnCLIPScheduler reads (the same names)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "SchedulerConfig":
        """Reads the dict of a diffusers `scheduler_config.json` (keys starting with "_" are ignored).

        Raises ValueError naming the key for any key or value UnCLIPScheduler does not have, e.g. a
        DDPMScheduler config's `beta_start`, since ignoring it would sample from a different process.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in names:
                raise ValueError(
                    f"scheduler config key {key!r} (value {value!r}) is not supported; "
                    f"UnCLIPScheduler takes only {names}")
            kwargs[key] = value
        return cls(**kwargs)


# Karlo v1 alpha's three stages (UNCLIP_FACTS.md, "Schedulers").
PRIOR = SchedulerConfig(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)
DECODER = SchedulerConfig(variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.0)
SUPER_RES = SchedulerConfig(variance_type="fixed_small_log", prediction_type="epsilon", clip_sample_range=1.0)


@flax.struct.dataclass
class SchedulerState:
    """The training schedule as float32 tables of shape (num_train_timesteps,)."""

    betas: jax.Array
    alphas_cumprod: jax.Array


def create_state(config: SchedulerConfig) -> SchedulerState:
    """Cosine schedule (Nichol & Dhariwal eq. 17, s = 0.008, beta capped at 0.999).

    The betas are computed in float64 and rounded to float32; the cumulative product of the float32
    alphas is accumulated in float64 and rounded once, as torch's CPU cumprod does: the tables then
    equal diffusers' bit for bit (a float32 running product drifts by up to 1.2e-6 relative).
    """
    n = config.num_train_timesteps

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float32)
    alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    return SchedulerState(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod))


# -------------------------------------------------------------------------------------- timesteps


def timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Inference timesteps, descending: round(arange(n) * (T - 1) / (n - 1)) reversed, shape (n,) int32.

    Karlo's spacing (diffusers UnCLIPScheduler.set_timesteps; numpy rounds half to even); it always
    starts at T - 1 and ends at 0. n=7 gives [999, 832, 666, 500, 333, 166, 0].
    """
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int; got {n!r}")
    if n < 2:
        raise ValueError(
            f"num_inference_steps={n} is too small: unCLIP's spacing is (T - 1) / (n - 1), which needs "
            "n >= 2 (the first step is always t = T - 1 and the last t = 0)")
    if n > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={n} exceeds num_train_timesteps={num_train_timesteps}: "
            "timesteps would repeat")
    ratio = (num_train_timesteps - 1) / (n - 1)
    return (np.arange(0, n) * ratio).round()[::-1].astype(np.int32)


def step_pairs(num_inference_steps: int, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(t, prev_t), each (n,) int32, prev_t = the next timestep in the list and -1 after the last.

    This is what a sampler scans over. (diffusers' pipelines pass prev_timestep=None on the last
    step, which UnCLIPScheduler reads as t - 1 = -1: the same thing, since the list ends at 0.)
    """
    t = timesteps(num_inference_steps, num_train_timesteps)
    return t, np.append(t[1:], np.int32(-1)).astype(np.int32)


# ---------------------------------------------------------------------------------------- helpers


def _timestep(t, name: str, sample: jax.Array) -> jax.Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer timestep; got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != sample.shape[0]):
        raise ValueError(
            f"{name} has shape {t.shape}; expected () or ({sample.shape[0]},) = one timestep per example "
            f"of a batch of shape {sample.shape}")
    return t.astype(jnp.int32)


def _bcast(coef: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar or per-example (B,) coefficient, shaped to broadcast over x's trailing axes."""
    return jnp.reshape(coef, coef.shape + (1,) * (x.ndim - coef.ndim))


def alpha_bar(state: SchedulerState, t) -> jax.Array:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), with alpha_bar = 1 for t < 0. Shape of t."""
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t >= 0, state.alphas_cumprod[jnp.maximum(t, 0)], jnp.float32(1.0))


def _split(config: SchedulerConfig, model_output, sample: jax.Array, need_variance: bool):
    """Model output -> (eps or x0, v or None), both float32. v lives in the last-axis second half."""
    mo = jnp.asarray(model_output).astype(jnp.float32)
    c, learned = sample.shape[-1], config.variance_type == "learned_range"
    if learned and mo.shape == sample.shape[:-1] + (2 * c,):
        return mo[..., :c], mo[..., c:]
    if mo.shape == sample.shape and not need_variance:
        return mo, None
    doubled = sample.shape[:-1] + (2 * c,)
    if need_variance:
        expected = f"{doubled} (prediction channels then variance channels v, on the last axis: NHWC)"
    elif learned:
        expected = f"{sample.shape} or {doubled} (prediction then variance channels on the last axis)"
    else:
        expected = f"{sample.shape} (the sample's shape)"
    raise ValueError(
        f"model_output has shape {mo.shape}; expected {expected} for a sample of shape {sample.shape} "
        f"with variance_type={config.variance_type!r}")


def _x0_from_eps(abar_t, sample, eps):
    # Ho et al. eq. 4 solved for x0: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
    return (sample - _bcast(jnp.sqrt(1 - abar_t), sample) * eps) / _bcast(jnp.sqrt(abar_t), sample)


def _x0_from(config, out, abar_t, sample, clip: bool):
    if config.prediction_type == "epsilon":
        x0 = _x0_from_eps(abar_t, sample, out)
    elif config.prediction_type == "v_prediction":
        x0 = _x0_from_v(abar_t, sample, out)
    else:
        x0 = out
    if clip:
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0


def _x0_from_v(abar_t, sample, v):
    # Salimans & Ho 2022: x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (no division at either end).
    return _bcast(jnp.sqrt(abar_t), sample) * sample - _bcast(jnp.sqrt(1 - abar_t), sample) * v


def _eps_from_x0(abar_t, sample, x0):
    return (sample - _bcast(jnp.sqrt(abar_t), sample) * x0) / _bcast(jnp.sqrt(1 - abar_t), sample)


def _eps_from(config, out, abar_t, sample, x0_raw):
    """The model's eps: its output ("epsilon"), from v without dividing ("v_prediction": eps = sqrt(abar_t) v
    + sqrt(1 - abar_t) x_t), or from its unclipped x0 ("sample")."""
    if config.prediction_type == "epsilon":
        return out
    if config.prediction_type == "v_prediction":
        return _bcast(jnp.sqrt(abar_t), sample) * out + _bcast(jnp.sqrt(1 - abar_t), sample) * sample
    return _eps_from_x0(abar_t, sample, x0_raw)


def predict_x0(state: SchedulerState, config: SchedulerConfig, model_output, t, sample, clip: bool | None = None):
    """Predicted x0, float32 of sample's shape; clipped to +-clip_sample_range when `clip` (default:
    config.clip_sample). model_output: sample's shape, or [pred | v] for learned_range (v ignored)."""
    sample = jnp.asarray(sample, jnp.float32)
    t = _timestep(t, "t", sample)
    out, _ = _split(config, model_output, sample, need_variance=False)
    return _x0_from(config, out, alpha_bar(state, t), sample, config.clip_sample if clip is None else clip)


# ----------------------------------------------------------------------------- ancestral (DDPM) step


def step(state: SchedulerState, config: SchedulerConfig, model_output, t, prev_t, sample, noise) -> jax.Array:
    """One ancestral step x_t -> x_{prev_t} (Ho et al. 2020 eqs. 6-7 on a respaced schedule).

    Exactly diffusers' UnCLIPScheduler.step(model_output, t, sample, prev_timestep=prev_t):
      beta = betas[t] if prev_t == t - 1 else 1 - abar_t / abar_prev   (abar_prev = 1 for prev_t < 0)
      x0 from eps, from v or directly, clipped; mean = posterior mean of q(x_prev | x_t, x0);
      std = sqrt(posterior variance) (fixed_small_log) or exp(log var / 2), log var = frac log beta
      + (1 - frac) log posterior variance, frac = (v + 1) / 2 (learned_range); noise only when t > 0.

    Args:
      model_output: sample's shape, or sample.shape[:-1] + (2C,) = [eps | v] for learned_range.
      t, prev_t: int timesteps, traced; scalars or (B,).
      sample: x_t, e.g. (B, 768) for the prior or (B, H, W, C).
      noise: standard normal noise of sample's shape (ignored where t == 0).
    Returns:
      x_{prev_t}, float32, sample's shape.
    """
    sample = jnp.asarray(sample, jnp.float32)
    t, prev_t = _timestep(t, "t", sample), _timestep(prev_t, "prev_t", sample)
    out, v = _split(config, model_output, sample, need_variance=config.variance_type == "learned_range")
    noise = jnp.asarray(noise).astype(jnp.float32)
    if noise.shape != sample.shape:
        raise ValueError(f"noise has shape {noise.shape}; expected the sample's shape {sample.shape}")

    abar_t, abar_prev = alpha_bar(state, t), alpha_bar(state, prev_t)
    # Karlo re-derives beta from the two abar values when steps are skipped; at prev_t == t - 1 it keeps
    # the table value. These differ in float32 (at t = 0: betas[0] / (1 - abar_0) = 0.99947, so the
    # final x0 comes out 0.05% shrunk) and we keep the branch to match the reference.
    beta = jnp.where(prev_t == t - 1, state.betas[jnp.maximum(t, 0)], 1 - abar_t / abar_prev)
    alpha = 1 - beta

    x0 = _x0_from(config, out, abar_t, sample, config.clip_sample)
    coef_x0 = jnp.sqrt(abar_prev) * beta / (1 - abar_t)
    coef_xt = jnp.sqrt(alpha) * (1 - abar_prev) / (1 - abar_t)
    mean = _bcast(coef_x0, sample) * x0 + _bcast(coef_xt, sample) * sample

    # Posterior variance is 0 at the last step (abar_prev = 1); the floor keeps log finite (no NaN
    # gradients through the discarded branch). It only differs from diffusers where variance < 1e-20.
    log_var_post = _bcast(jnp.log(jnp.maximum((1 - abar_prev) / (1 - abar_t) * beta, 1e-20)), sample)
    if config.variance_type == "fixed_small_log":
        log_var = log_var_post
    else:
        frac = (v + 1) / 2
        log_var = frac * _bcast(jnp.log(beta), sample) + (1 - frac) * log_var_post
    return mean + jnp.where(_bcast(t > 0, sample), jnp.exp(0.5 * log_var) * noise, 0.0)


# ---------------------------------------------------------------------------------------------- DDIM


def ddim_sigma(state: SchedulerState, t, prev_t, eta) -> jax.Array:
    """sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Song et al.
    2021 eq. 16): eta = 1 is the DDPM posterior std, eta = 0 deterministic DDIM. Shape of t."""
    abar_t, abar_prev = alpha_bar(state, t), alpha_bar(state, prev_t)
    return jnp.asarray(eta, jnp.float32) * jnp.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))


def ddim_step(state: SchedulerState, config: SchedulerConfig, model_output, t, prev_t, sample, noise, eta,
              *, use_clipped_model_output: bool = False) -> jax.Array:
    """One DDIM step x_t -> x_{prev_t} (Song et al. 2021 eq. 12):

      x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise,  sigma = ddim_sigma(eta).

    x0 is clipped as in `step`. eps is the model's for "epsilon", from v for "v_prediction" and from x0 for
    "sample"; with `use_clipped_model_output` (static) eps is re-derived from the clipped x0 in both cases, as
    guided-diffusion / Karlo's ddim_sample do (diffusers' default is False, as here).
    Learned-range v channels, if present, are ignored. eta is traced (scalar or (B,)); noise may be None
    for eta = 0. Returns float32 of sample's shape.
    """
    sample = jnp.asarray(sample, jnp.float32)
    t, prev_t = _timestep(t, "t", sample), _timestep(prev_t, "prev_t", sample)
    out, _ = _split(config, model_output, sample, need_variance=False)
    abar_t, abar_prev = alpha_bar(state, t), alpha_bar(state, prev_t)

    x0_raw = _x0_from(config, out, abar_t, sample, clip=False)
    x0 = _x0_from(config, out, abar_t, sample, clip=config.clip_sample)
    if use_clipped_model_output:
        eps = _eps_from_x0(abar_t, sample, x0)
    else:
        eps = _eps_from(config, out, abar_t, sample, x0_raw)

    sigma = ddim_sigma(state, t, prev_t, eta)
    # eta > 1 (or rounding at eta = 1) can push the direction term's variance below 0.
    dir_coef = jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0))
    x_prev = _bcast(jnp.sqrt(abar_prev), sample) * x0 + _bcast(dir_coef, sample) * eps
    if noise is None:
        return x_prev
    noise = jnp.asarray(noise).astype(jnp.float32)
    if noise.shape != sample.shape:
        raise ValueError(f"noise has shape {noise.shape}; expected the sample's shape {sample.shape}")
    return x_prev + _bcast(sigma, sample) * noise


def ddim_invert_step(state: SchedulerState, config: SchedulerConfig, model_output, t, next_t, sample,
                     clip: bool = False) -> jax.Array:
    """DDIM inversion x_t -> x_{next_t}, next_t > t: the eta = 0 step run forwards in time
    (unCLIP section 3.1 inverts images to the decoder's x_T this way).

      x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps,  model evaluated at (x_t, t).

    x0 is not clipped unless `clip` (static), since clipping breaks exact invertibility; eps is derived
    from x0 for "sample". Returns float32 of sample's shape.
    """
    sample = jnp.asarray(sample, jnp.float32)
    t, next_t = _timestep(t, "t", sample), _timestep(next_t, "next_t", sample)
    out, _ = _split(config, model_output, sample, need_variance=False)
    abar_t, abar_next = alpha_bar(state, t), alpha_bar(state, next_t)
    x0 = _x0_from(config, out, abar_t, sample, clip=clip)
    eps = _eps_from(config, out, abar_t, sample, x0)
    return _bcast(jnp.sqrt(abar_next), sample) * x0 + _bcast(jnp.sqrt(1 - abar_next), sample) * eps


# ------------------------------------------------------------------ training (full 1000-step schedule)


def velocity(state: SchedulerState, x0, t, noise) -> jax.Array:
    """The v target of x_t = q_sample(state, x0, t, noise): sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (what a
    "v_prediction" model predicts). x0, noise: (B, ...); t: (B,) or scalar. Returns float32 (B, ...)."""
    x0 = jnp.asarray(x0, jnp.float32)
    abar = alpha_bar(state, _timestep(t, "t", x0))
    return _bcast(jnp.sqrt(abar), x0) * jnp.asarray(noise, jnp.float32) - _bcast(jnp.sqrt(1 - abar), x0) * x0


def x0_from_velocity(state: SchedulerState, x_t, t, v) -> jax.Array:
    """The x0 a "v_prediction" model's v implies at (x_t, t), unclipped, float32 (as predict_x0 with clip=False)."""
    x_t = jnp.asarray(x_t, jnp.float32)
    return _x0_from_v(alpha_bar(state, _timestep(t, "t", x_t)), x_t, jnp.asarray(v, jnp.float32))


def q_sample(state: SchedulerState, x0, t, noise) -> jax.Array:
    """Forward noising q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (Ho et al. eq. 4).
    x0, noise: (B, ...); t: (B,) or scalar. Returns float32 (B, ...)."""
    x0 = jnp.asarray(x0, jnp.float32)
    abar = alpha_bar(state, _timestep(t, "t", x0))
    return _bcast(jnp.sqrt(abar), x0) * x0 + _bcast(jnp.sqrt(1 - abar), x0) * jnp.asarray(noise, jnp.float32)


def _posterior_variance(state: SchedulerState, t):
    return state.betas[t] * (1 - alpha_bar(state, t - 1)) / (1 - alpha_bar(state, t))


def posterior_mean_variance(state: SchedulerState, x0, x_t, t):
    """q(x_{t-1} | x_t, x0) on the training schedule (Ho et al. eqs. 6-7), t in [0, T), (B,) or scalar.

    Returns (mean (B, ...), variance, log_variance_clipped), the last two shaped (B, 1, ...) to
    broadcast. The log variance at t = 0 (where the variance is 0) is the one at t = 1, as in
    guided-diffusion.
    """
    x0, x_t = jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32)
    t = _timestep(t, "t", x_t)
    beta, abar_t, abar_prev = state.betas[t], alpha_bar(state, t), alpha_bar(state, t - 1)
    coef_x0 = beta * jnp.sqrt(abar_prev) / (1 - abar_t)
    coef_xt = (1 - abar_prev) * jnp.sqrt(1 - beta) / (1 - abar_t)
    mean = _bcast(coef_x0, x_t) * x0 + _bcast(coef_xt, x_t) * x_t
    variance = _posterior_variance(state, t)
    log_variance = jnp.log(_posterior_variance(state, jnp.maximum(t, 1)))
    return mean, _bcast(variance, x_t), _bcast(log_variance, x_t)


def learned_range_log_variance(state: SchedulerState, v, t) -> jax.Array:
    """log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (Nichol & Dhariwal
    eq. 15, with guided-diffusion's clipped log beta~ at t = 0). v: (B, ..., C); t: (B,) or scalar."""
    v = jnp.asarray(v, jnp.float32)
    t = _timestep(t, "t", v)
    min_log = _bcast(jnp.log(_posterior_variance(state, jnp.maximum(t, 1))), v)
    max_log = _bcast(jnp.log(state.betas[t]), v)
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    # guided-diffusion's tanh approximation, kept so that losses match that code base.
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> jax.Array:
    """log-likelihood (nats, elementwise) of 8-bit images x in [-1, 1] under a Gaussian discretised to
    bins of width 2/255, the outer bins extended to +-inf (Ho et al. section 3.3)."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # The floors keep log (and its gradient) finite when a bin's probability underflows.
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_loss(state: SchedulerState, x0, x_t, t, eps_pred, v, *, x0_pred=None) -> jax.Array:
    """Variational-bound term L_vlb of the hybrid loss (Nichol & Dhariwal section 3.1), bits per dim.

    The mean comes from eps_pred under stop_gradient, so this term trains only the variance v (the
    mean is trained by the simple MSE loss). x0 is not clipped (guided-diffusion's training setting).
    L_0 = decoder NLL of x0 (discretised Gaussian) where t == 0, L_{t-1} = KL(q posterior || p) elsewhere.

    Args: x0, x_t, eps_pred, v: (B, H, W, C) (any (B, ...)); t: (B,) int on the 1000-step schedule.
    x0_pred: a model that predicts x0 passes it here (and eps_pred None): used as it is, never derived.
    Returns: (B,) float32. guided-diffusion's hybrid loss scales this by num_timesteps / 1000 (= 1 here).
    """
    x0, x_t = jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32)
    t = _timestep(t, "t", x_t)
    if x0_pred is None:
        eps = jax.lax.stop_gradient(jnp.asarray(eps_pred, jnp.float32))
        x0_pred = _x0_from_eps(alpha_bar(state, t), x_t, eps)
    else:
        x0_pred = jax.lax.stop_gradient(jnp.asarray(x0_pred, jnp.float32))
    model_mean, _, _ = posterior_mean_variance(state, x0_pred, x_t, t)
    model_log_var = learned_range_log_variance(state, v, t)
    true_mean, _, true_log_var = posterior_mean_variance(state, x0, x_t, t)

    axes = tuple(range(1, x_t.ndim))
    kl = jnp.mean(normal_kl(true_mean, true_log_var, model_mean, model_log_var), axis=axes) / math.log(2.0)
    nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var),
                    axis=axes) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)
