"""Specification of unclip_jax.diffusion.scheduler, with diffusers' UnCLIPScheduler as the reference."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UnCLIPScheduler
from diffusers.schedulers import scheduling_unclip
from parity import assert_close, nchw, nhwc

from unclip_jax.diffusion import (
    DECODER, PRIOR, SUPER_RES, SchedulerConfig, create_state, ddim_invert_step, ddim_sigma, ddim_step,
    discretized_gaussian_log_likelihood, learned_range_log_variance, normal_kl, posterior_mean_variance,
    predict_x0, q_sample, step, step_pairs, timesteps, vb_loss, velocity, x0_from_velocity,
)

# stage -> (config, sample shape, model-output channels). The prior is flat (B, 768); images are NHWC.
STAGES = {
    "prior": (PRIOR, (3, 768), 768),
    "decoder": (DECODER, (2, 8, 8, 3), 6),
    "super_res": (SUPER_RES, (2, 8, 8, 3), 3),
}
jit_step = jax.jit(step, static_argnums=1)


def to_torch(x):
    x = np.asarray(x, dtype=np.float32)
    return nchw(x) if x.ndim == 4 else torch.from_numpy(x.copy())


def from_torch(x):
    return nhwc(x) if x.ndim == 4 else x.numpy()


def random_model_output(rng, config, shape, channels):
    """x0 predictions around the clip range, or unit eps; decoder v uniform in [-1, 1] appended."""
    scale = 4.0 if config.prediction_type == "sample" else 1.0
    out = scale * rng.standard_normal(shape[:-1] + (shape[-1],))
    if channels == 2 * shape[-1]:
        out = np.concatenate([out, rng.uniform(-1, 1, shape)], axis=-1)
    return out.astype(np.float32)


def reference_scheduler(config):
    fields = dataclasses.asdict(config)
    return UnCLIPScheduler(**fields)


# ------------------------------------------------------------------------------------- timesteps


def test_timesteps_are_karlos_spacing():
    t25 = timesteps(25)
    assert t25.dtype == np.int32 and list(t25[:3]) == [999, 957, 916] and list(t25[-2:]) == [42, 0]
    assert list(timesteps(7)) == [999, 832, 666, 500, 333, 166, 0]
    ref = UnCLIPScheduler()
    for n in (2, 3, 7, 25, 50, 64, 250, 999, 1000):
        ref.set_timesteps(n)
        np.testing.assert_array_equal(timesteps(n), ref.timesteps.numpy(), err_msg=f"n={n}")


def test_step_pairs_end_with_minus_one():
    t, prev = step_pairs(7)
    assert list(prev) == [832, 666, 500, 333, 166, 0, -1] and list(t) == list(timesteps(7))
    assert t.dtype == prev.dtype == np.int32


def test_tables_equal_diffusers_bit_for_bit():
    state, ref = create_state(DECODER), UnCLIPScheduler()
    np.testing.assert_array_equal(np.asarray(state.betas), ref.betas.numpy())
    np.testing.assert_array_equal(np.asarray(state.alphas_cumprod), ref.alphas_cumprod.numpy())


# -------------------------------------------------------------------------------- parity: step


@pytest.mark.parametrize("n", [25, 7])
@pytest.mark.parametrize("stage", list(STAGES))
def test_step_matches_diffusers_over_full_schedule(stage, n, monkeypatch):
    config, shape, channels = STAGES[stage]
    state, ref = create_state(config), reference_scheduler(config)
    ref.set_timesteps(n)
    rng = np.random.default_rng(n)
    x = rng.standard_normal(shape).astype(np.float32)
    clipped = total = 0
    t_list, prev_list = step_pairs(n)
    for i, (t, prev) in enumerate(zip(t_list, prev_list)):
        out = random_model_output(rng, config, shape, channels)
        noise = rng.standard_normal(shape).astype(np.float32)
        monkeypatch.setattr(scheduling_unclip, "randn_tensor", lambda *a, _n=noise, **k: to_torch(_n))
        # The pipelines pass prev_timestep=None on the last step; step_pairs says -1.
        ref_prev = None if i == n - 1 else int(prev)
        expected = ref.step(to_torch(out), int(t), to_torch(x), prev_timestep=ref_prev).prev_sample
        actual = jit_step(state, config, out, t, prev, x, noise)
        assert actual.dtype == jnp.float32
        assert_close(actual, from_torch(expected), tol=1e-5, what=f"{stage} n={n} t={t}")

        x0 = np.asarray(predict_x0(state, config, out, t, x, clip=False))
        clipped += int(np.sum(np.abs(x0) > config.clip_sample_range))
        total += x0.size
        x = np.asarray(actual)
    assert 0.05 < clipped / total < 0.95, f"clipping active for {clipped}/{total} entries: not a real test"


@pytest.mark.parametrize("stage", list(STAGES))
def test_step_matches_diffusers_on_unskipped_steps(stage, monkeypatch):
    """prev_t == t - 1 takes the table beta instead of the respaced one (the 1000-step schedule)."""
    config, shape, channels = STAGES[stage]
    state, ref = create_state(config), reference_scheduler(config)
    rng = np.random.default_rng(1)
    for t in (999, 998, 500, 2, 1, 0):
        x = rng.standard_normal(shape).astype(np.float32)
        out = random_model_output(rng, config, shape, channels)
        noise = rng.standard_normal(shape).astype(np.float32)
        monkeypatch.setattr(scheduling_unclip, "randn_tensor", lambda *a, _n=noise, **k: to_torch(_n))
        expected = ref.step(to_torch(out), t, to_torch(x), prev_timestep=t - 1).prev_sample
        actual = jit_step(state, config, out, t, t - 1, x, noise)
        assert_close(actual, from_torch(expected), tol=1e-5, what=f"{stage} t={t}")


def test_step_accepts_bf16_model_output_and_computes_in_float32():
    config, shape, channels = STAGES["decoder"]
    state, rng = create_state(config), np.random.default_rng(2)
    out = random_model_output(rng, config, shape, channels)
    x, noise = rng.standard_normal(shape), rng.standard_normal(shape)
    out_bf16 = jnp.asarray(out, jnp.bfloat16)
    actual = step(state, config, out_bf16, 500, 458, x, noise)
    expected = step(state, config, np.asarray(out_bf16.astype(jnp.float32)), 500, 458, x, noise)
    assert actual.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def test_step_takes_one_timestep_per_example():
    config, shape, channels = STAGES["decoder"]
    state, rng = create_state(config), np.random.default_rng(3)
    out = random_model_output(rng, config, shape, channels)
    x, noise = rng.standard_normal(shape), rng.standard_normal(shape)
    t, prev = np.array([999, 500], np.int32), np.array([957, 458], np.int32)
    batched = step(state, config, out, t, prev, x, noise)
    for b in range(2):
        row = step(state, config, out[b:b + 1], t[b], prev[b], x[b:b + 1], noise[b:b + 1])
        np.testing.assert_allclose(batched[b:b + 1], row, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ compilation


def test_step_compiles_once_for_all_timesteps():
    config, shape, channels = STAGES["decoder"]
    state, rng = create_state(config), np.random.default_rng(4)
    traces = 0

    def one_step(t, prev_t, out, x, noise):
        nonlocal traces
        traces += 1
        return step(state, config, out, t, prev_t, x, noise)

    compiled = jax.jit(one_step)
    for t, prev in zip(*step_pairs(7)):
        out = random_model_output(rng, config, shape, channels)
        compiled(t, prev, out, rng.standard_normal(shape), rng.standard_normal(shape))
    assert traces == 1


def test_scanned_sampler_equals_python_loop():
    config, shape, channels = STAGES["super_res"]
    state, rng = create_state(config), np.random.default_rng(5)
    t, prev = step_pairs(7)
    outs = np.stack([random_model_output(rng, config, shape, channels) for _ in t])
    noises = rng.standard_normal((len(t),) + shape).astype(np.float32)
    x_T = rng.standard_normal(shape).astype(np.float32)

    def body(x, xs):
        ti, pi, out, noise = xs
        return step(state, config, out, ti, pi, x, noise), None

    scanned, _ = jax.jit(lambda x: jax.lax.scan(body, x, (t, prev, outs, noises)))(x_T)
    x = x_T
    for i in range(len(t)):
        x = step(state, config, outs[i], t[i], prev[i], x, noises[i])
    np.testing.assert_allclose(scanned, x, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ DDIM


@pytest.mark.parametrize("stage", list(STAGES))
def test_ddim_then_inversion_round_trips(stage):
    """With a fixed prediction (and x0 inside the clip range), eta=0 DDIM and inversion are inverses."""
    config, shape, channels = STAGES[stage]
    state, rng = create_state(config), np.random.default_rng(6)
    x0 = rng.uniform(-0.5, 0.5, shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    v = rng.uniform(-1, 1, shape).astype(np.float32)
    for t, prev in zip(*step_pairs(25)):
        if prev < 0:
            continue
        x_t = q_sample(state, x0, t, eps)
        pred = x0 if config.prediction_type == "sample" else eps
        out = np.concatenate([pred, v], -1) if channels == 2 * shape[-1] else pred
        x_prev = ddim_step(state, config, out, t, prev, x_t, None, 0.0)
        x_back = ddim_invert_step(state, config, out, prev, t, x_prev)
        assert_close(x_back, x_t, tol=1e-5, what=f"{stage} round trip {t} -> {prev} -> {t}")


def test_ddim_eta_is_traced_and_eta_zero_ignores_noise():
    config, shape, channels = STAGES["decoder"]
    state, rng = create_state(config), np.random.default_rng(7)
    out = random_model_output(rng, config, shape, channels)
    x = rng.standard_normal(shape).astype(np.float32)
    traces = 0

    def f(eta, noise):
        nonlocal traces
        traces += 1
        return ddim_step(state, config, out, 500, 458, x, noise, eta)

    compiled = jax.jit(f)
    results = [compiled(jnp.float32(eta), rng.standard_normal(shape).astype(np.float32))
               for eta in (0.0, 0.0, 0.5, 1.0)]
    assert traces == 1
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.allclose(results[2], results[0])


@pytest.mark.parametrize("t", [1, 2, 10, 250, 500, 999])
def test_ddim_eta_one_is_ddpm_on_unskipped_steps(t):
    """eta = 1 with prev_t = t - 1: the noise scale is the posterior std of `step`'s fixed_small_log,
    and the mean is the DDPM posterior mean (x0 unclipped). The tolerance covers float32 rounding
    of 1 - abar_t / abar_{t-1} against the table's betas[t] (2e-4 relative at t = 2)."""
    config = SUPER_RES
    state, rng = create_state(config), np.random.default_rng(t)
    x0 = rng.uniform(-0.5, 0.5, (2, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    x_t = q_sample(state, x0, t, eps)
    ones, zeros = np.ones_like(x0), np.zeros_like(x0)
    ddpm_std = step(state, config, eps, t, t - 1, x_t, ones) - step(state, config, eps, t, t - 1, x_t, zeros)
    ddim_std = (ddim_step(state, config, eps, t, t - 1, x_t, ones, 1.0)
                - ddim_step(state, config, eps, t, t - 1, x_t, zeros, 1.0))
    np.testing.assert_allclose(ddim_std, ddpm_std, rtol=5e-4)
    np.testing.assert_allclose(ddim_sigma(state, t, t - 1, 1.0), ddpm_std[0, 0, 0, 0], rtol=5e-4)
    np.testing.assert_allclose(ddim_step(state, config, eps, t, t - 1, x_t, zeros, 1.0),
                               step(state, config, eps, t, t - 1, x_t, zeros), rtol=1e-3, atol=2e-5)


def test_learned_range_std_is_the_training_log_variance():
    """At prev_t = t - 1 (t >= 1) sampling's learned-range variance is Nichol & Dhariwal eq. 15."""
    config, shape, _ = STAGES["decoder"]
    state, rng = create_state(config), np.random.default_rng(8)
    v = rng.uniform(-1, 1, shape)
    x = np.zeros(shape)  # x = eps = 0 gives mean 0, so the difference below is the std exactly
    out = np.concatenate([np.zeros(shape), v], -1)
    for t in (1, 300, 999):
        std = step(state, config, out, t, t - 1, x, np.ones(shape)) - step(state, config, out, t, t - 1, x, np.zeros(shape))
        np.testing.assert_allclose(std, np.exp(0.5 * learned_range_log_variance(state, v, t)), rtol=1e-5)


# ------------------------------------------------------------------------------- training terms


def test_q_sample_is_forward_noising_per_example():
    state, rng = create_state(DECODER), np.random.default_rng(9)
    x0, eps = rng.standard_normal((3, 4, 4, 3)), rng.standard_normal((3, 4, 4, 3))
    t = np.array([0, 500, 999], np.int32)
    abar = np.asarray(state.alphas_cumprod, np.float64)[t][:, None, None, None]
    expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    np.testing.assert_allclose(q_sample(state, x0, t, eps), expected, rtol=1e-5, atol=1e-6)
    ref = UnCLIPScheduler().add_noise(to_torch(x0), to_torch(eps), torch.from_numpy(t.astype(np.int64)))
    assert_close(q_sample(state, x0, t, eps), from_torch(ref), tol=1e-6)
    flat = q_sample(state, x0[:, 0, 0], t, eps[:, 0, 0])  # (B, 768)-style inputs broadcast too
    np.testing.assert_allclose(flat, expected[:, 0, 0], rtol=1e-5, atol=1e-6)


def _vb_numpy(state, x0, x_t, t, eps, v):
    """guided-diffusion's _vb_terms_bpd for LEARNED_RANGE, transcribed to float64 numpy.

    It starts from the same float32 tables: 1 - abar_t near t = 0 is only good to ~1e-3 relative in
    float32, so a float64 recomputation of the cumulative product would differ by that much at t = 0.
    """
    betas, abar = np.asarray(state.betas, np.float64), np.asarray(state.alphas_cumprod, np.float64)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = betas * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    e = lambda a: a[t][:, None, None, None]  # noqa: E731
    x0_pred = np.sqrt(1 / e(abar)) * x_t - np.sqrt(1 / e(abar) - 1) * eps
    model_mean = e(coef1) * x0_pred + e(coef2) * x_t
    true_mean = e(coef1) * x0 + e(coef2) * x_t
    frac = (v + 1) / 2
    model_log_var = frac * e(np.log(betas)) + (1 - frac) * e(post_log_var)
    true_log_var = e(post_log_var)
    kl = 0.5 * (-1 + model_log_var - true_log_var + np.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * np.exp(-model_log_var))
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    inv_std = np.exp(-0.5 * model_log_var)
    plus, minus = cdf(inv_std * (x0 - model_mean + 1 / 255)), cdf(inv_std * (x0 - model_mean - 1 / 255))
    log_probs = np.where(x0 < -0.999, np.log(np.maximum(plus, 1e-12)),
                         np.where(x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                                  np.log(np.maximum(plus - minus, 1e-12))))
    kl_bpd = kl.mean(axis=(1, 2, 3)) / np.log(2)
    nll_bpd = -log_probs.mean(axis=(1, 2, 3)) / np.log(2)
    return np.where(t == 0, nll_bpd, kl_bpd)


def _training_batch(state, t, seed, eps_error=0.1):
    rng = np.random.default_rng(seed)
    shape = (len(t), 4, 4, 3)
    x0 = (rng.integers(0, 256, shape) / 127.5 - 1).astype(np.float32)  # 8-bit images, incl. +-1
    eps = rng.standard_normal(shape).astype(np.float32)
    x_t = np.asarray(q_sample(state, x0, t, eps))
    eps_pred = (eps + eps_error * rng.standard_normal(shape)).astype(np.float32)
    v = rng.uniform(-1, 1, shape).astype(np.float32)
    return x0, x_t, eps, eps_pred, v


def test_vb_loss_matches_guided_diffusion_transcription():
    state = create_state(DECODER)
    t = np.array([0, 0, 1, 2, 100, 500, 998, 999], np.int32)
    x0, x_t, _, eps_pred, v = _training_batch(state, t, seed=10, eps_error=0.5)
    actual = np.asarray(jax.jit(vb_loss)(state, x0, x_t, t, eps_pred, v))
    expected = _vb_numpy(state, x0, x_t, t, eps_pred, v)
    assert actual.shape == (len(t),) and np.all(expected > 0)
    np.testing.assert_allclose(actual, expected, rtol=1e-4)


def test_kl_is_zero_at_the_true_posterior():
    state = create_state(DECODER)
    mean, var, log_var = posterior_mean_variance(state, np.ones((2, 3)), np.zeros((2, 3)), np.array([3, 700]))
    assert var.shape == log_var.shape == (2, 1)
    np.testing.assert_array_equal(normal_kl(mean, log_var, mean, log_var), 0.0)
    # eps_pred = the true eps and v = -1 (frac 0 -> the posterior log variance) make p equal q.
    t = np.array([1, 2, 100, 500, 999], np.int32)
    x0, x_t, eps, _, _ = _training_batch(state, t, seed=11)
    loss = vb_loss(state, x0, x_t, t, eps, -np.ones_like(x0))
    np.testing.assert_allclose(loss, 0.0, atol=1e-5)


def test_vb_loss_trains_only_the_variance_with_finite_gradients():
    state = create_state(DECODER)
    t = np.array([0, 1, 500, 999], np.int32)
    x0, x_t, _, eps_pred, v = _training_batch(state, t, seed=12, eps_error=1.0)
    g_eps, g_v = jax.grad(lambda e, v: vb_loss(state, x0, x_t, t, e, v).sum(), argnums=(0, 1))(eps_pred, v)
    np.testing.assert_array_equal(g_eps, 0.0)
    assert np.all(np.isfinite(g_v)) and np.any(g_v != 0)


def test_vb_loss_of_an_x0_model_equals_that_of_the_same_prediction_as_noise():
    state = create_state(DECODER)
    t = np.array([0, 1, 100, 500, 900], np.int32)   # not 999: there x0 from eps is ill-conditioned
    x0, x_t, _, eps_pred, v = _training_batch(state, t, seed=13, eps_error=0.3)
    x0_pred = np.asarray(predict_x0(state, DECODER, eps_pred, t, x_t, clip=False))
    np.testing.assert_allclose(vb_loss(state, x0, x_t, t, None, v, x0_pred=x0_pred),
                               vb_loss(state, x0, x_t, t, eps_pred, v), rtol=1e-4, atol=1e-6)
    g = jax.grad(lambda p: vb_loss(state, x0, x_t, t, None, v, x0_pred=p).sum())(x0_pred)
    np.testing.assert_array_equal(g, 0.0)   # the mean is trained by the MSE alone


def test_discretized_likelihood_sums_to_one_over_the_bins():
    bins = np.linspace(-1, 1, 256, dtype=np.float32)
    logp = discretized_gaussian_log_likelihood(bins, np.float32(0.1), np.float32(math.log(0.3)))
    assert abs(float(np.exp(np.asarray(logp, np.float64)).sum()) - 1.0) < 1e-3


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("n", [1, 0, -3])
def test_fewer_than_two_steps_is_refused(n):
    with pytest.raises(ValueError, match=r"n >= 2.*|spacing.*n - 1"):
        timesteps(n)
    with pytest.raises(ValueError, match=f"num_inference_steps={n}"):
        step_pairs(n)


@pytest.mark.parametrize("key, value", [
    ("beta_schedule", "linear"), ("variance_type", "learned"), ("prediction_type", "v"),
    ("clip_sample_range", -1.0), ("beta_start", 0.0001), ("thresholding", True),
])
def test_unsupported_diffusers_config_is_refused_by_name(key, value):
    with pytest.raises(ValueError, match=re.escape(key)):
        SchedulerConfig.from_diffusers({"_class_name": "UnCLIPScheduler", key: value})


def test_karlo_scheduler_configs_load():
    decoder = {"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.12.0.dev0", "clip_sample": True,
               "clip_sample_range": 1, "num_train_timesteps": 1000, "prediction_type": "epsilon",
               "variance_type": "learned_range"}
    assert SchedulerConfig.from_diffusers(decoder) == DECODER
    prior = dict(decoder, clip_sample_range=5.0, prediction_type="sample", variance_type="fixed_small_log",
                 beta_schedule="squaredcos_cap_v2")
    assert SchedulerConfig.from_diffusers(prior) == PRIOR
    assert hash(SchedulerConfig.from_diffusers(prior)) == hash(PRIOR)


def test_learned_range_without_variance_channels_names_the_expected_shape():
    state, x = create_state(DECODER), np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=re.escape("expected (2, 8, 8, 6)")):
        step(state, DECODER, np.zeros((2, 8, 8, 3)), 999, 957, x, x)
    with pytest.raises(ValueError, match=re.escape("(2, 8, 8, 3)")):
        step(create_state(SUPER_RES), SUPER_RES, np.zeros((2, 8, 8, 6)), 999, 957, x, x)
    with pytest.raises(ValueError, match=re.escape("expected (2, 8, 8, 3) or (2, 8, 8, 6)")):
        ddim_step(state, DECODER, np.zeros((2, 8, 8, 5)), 999, 957, x, x, 0.0)


# ---------------------------------------------------------------------------- v prediction (ours, not diffusers')


V_DECODER = dataclasses.replace(DECODER, prediction_type="v_prediction")


@pytest.mark.parametrize("clip", [False, True])
def test_v_prediction_steps_as_the_x0_and_eps_it_stands_for(clip):
    """diffusers' UnCLIPScheduler has no v_prediction; its meaning is fixed by the identities
    v = sqrt(abar) eps - sqrt(1 - abar) x0 and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: a v model steps, DDIM-steps
    and inverts exactly as the "sample" and "epsilon" models that predict the same x0 and eps."""
    config = dataclasses.replace(V_DECODER, clip_sample=clip)
    state, rng = create_state(config), np.random.default_rng(21)
    shape = (4, 8, 8, 3)
    x0 = rng.uniform(-1.5 if clip else -0.9, 1.5 if clip else 0.9, shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    var = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = np.array([999, 700, 300, 20], np.int32)
    prev = np.array([957, 650, 250, 0], np.int32)
    abar = np.asarray(state.alphas_cumprod)[t][:, None, None, None]
    x_t = np.asarray(q_sample(state, x0, t, eps))
    v = (np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0).astype(np.float32)
    as_x0 = dataclasses.replace(config, prediction_type="sample")
    as_eps = dataclasses.replace(config, prediction_type="epsilon")
    cat = lambda p: np.concatenate([p, var], -1)
    assert_close(predict_x0(state, config, v, t, x_t, clip=False), x0, tol=2e-5, what="x0 from v")
    assert_close(step(state, config, cat(v), t, prev, x_t, noise), step(state, as_x0, cat(x0), t, prev, x_t, noise),
                 tol=2e-5, what="ancestral step")
    assert_close(ddim_step(state, config, v, t, prev, x_t, noise, 0.5),
                 ddim_step(state, as_eps if not clip else as_x0, eps if not clip else x0, t, prev, x_t, noise, 0.5),
                 tol=1e-4, what="DDIM step")
    # inversion evaluates the model at (x_t, prev): the v there of the eps model's prediction eps
    abar_p = np.asarray(state.alphas_cumprod)[prev][:, None, None, None]
    x0_p = (x_t - np.sqrt(1 - abar_p) * eps) / np.sqrt(abar_p)
    v_p = (np.sqrt(abar_p) * eps - np.sqrt(1 - abar_p) * x0_p).astype(np.float32)
    assert_close(ddim_invert_step(state, config, v_p, prev, t, x_t),
                 ddim_invert_step(state, as_eps, eps, prev, t, x_t), tol=1e-4, what="DDIM inversion")


def test_v_prediction_at_the_ends_of_the_schedule_is_well_conditioned():
    """What v_prediction is for: at t = 999 the x0 of an eps model divides its error by sqrt(abar) ~ 5e-5, and
    at t = 0 an x0 model must reproduce x_t's edges itself; a v model's x0 error is its own error times
    sqrt(1 - abar) <= 1 everywhere."""
    state = create_state(V_DECODER)
    rng = np.random.default_rng(3)
    x_t = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    err = 1e-3 * rng.standard_normal(x_t.shape).astype(np.float32)
    for t in (0, 500, 999):
        v = rng.standard_normal(x_t.shape).astype(np.float32)
        moved = predict_x0(state, V_DECODER, v + err, t, x_t, clip=False) - predict_x0(state, V_DECODER, v, t, x_t,
                                                                                      clip=False)
        assert float(jnp.max(jnp.abs(moved))) <= float(np.max(np.abs(err))) * 1.0001
        if t == 999:   # the same output read as an eps model's
            eps_moved = (predict_x0(state, DECODER, v + err, t, x_t, clip=False)
                         - predict_x0(state, DECODER, v, t, x_t, clip=False))
            assert float(jnp.max(jnp.abs(eps_moved))) > 100 * float(np.max(np.abs(err)))


def test_v_prediction_round_trips_through_ddim_and_its_config():
    state, rng = create_state(V_DECODER), np.random.default_rng(8)
    x0 = rng.uniform(-0.5, 0.5, (2, 8, 8, 3)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    for t, prev in zip(*step_pairs(25)):
        if prev < 0:
            continue
        v_at = lambda s: np.float32(np.sqrt(np.asarray(state.alphas_cumprod)[s])) * eps - np.float32(
            np.sqrt(1 - np.asarray(state.alphas_cumprod)[s])) * x0   # the v of (x0, eps) at step s
        x_t = q_sample(state, x0, t, eps)
        x_prev = ddim_step(state, V_DECODER, v_at(t), t, prev, x_t, None, 0.0)
        assert_close(ddim_invert_step(state, V_DECODER, v_at(prev), prev, t, x_prev), x_t, tol=1e-5,
                     what=f"{t} -> {prev}")
    assert SchedulerConfig.from_diffusers({"_class_name": "UnCLIPScheduler", **V_DECODER.to_diffusers()}) == V_DECODER


def test_velocity_is_the_v_target_and_x0_from_velocity_inverts_it():
    """The training target of a v model and the x0 it implies: velocity = sqrt(abar) noise - sqrt(1 - abar) x0
    per example, and x0_from_velocity(x_t, velocity) = x0 = predict_x0 of a v_prediction config, unclipped."""
    state, rng = create_state(V_DECODER), np.random.default_rng(5)
    x0 = rng.uniform(-1.4, 1.4, (3, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 480, 999], np.int32)
    abar = np.asarray(state.alphas_cumprod, np.float64)[t][:, None, None, None]
    v = velocity(state, x0, t, noise)
    assert_close(v, np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0, tol=1e-6, what="velocity")
    x_t = q_sample(state, x0, t, noise)
    assert_close(x0_from_velocity(state, x_t, t, v), x0, tol=2e-5, what="x0 from velocity")
    assert_close(x0_from_velocity(state, x_t, t, v), predict_x0(state, V_DECODER, v, t, x_t, clip=False), tol=0,
                 what="as predict_x0")
