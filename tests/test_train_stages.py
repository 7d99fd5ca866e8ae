"""Each stage learns (its loss falls when overfitting one fixed batch), the non-finite guard catches a NaN
batch, and the pieces around the step behave: synthetic data, mesh sizes, the learning-rate schedule, sample
grids, config checks.

The training runs happen in one subprocess (a cheap XLA CPU backend, a persistent compilation cache): the
rest of the test session keeps its own XLA settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train_sharding import run_job, tiny_config

STAGES = ("prior", "decoder", "upsampler", "upsampler_1024")
# The prior again: with gradient accumulation over 2 micro-batches; and with batches without text hidden states,
# which the frozen CLIP text tower (kept in the train state) computes inside the step.
RUNS = STAGES + ("prior_accumulating", "prior_text_tower")
OVERFIT_STEPS = 30


def small(run: str):
    """The tiny config, smaller still where it costs time: fewer, smaller upsampler crops."""
    c = tiny_config(run.split("_")[0] if run.startswith("prior") else run)
    c.grad_accum_steps = 2 if run == "prior_accumulating" else 1
    c.frozen_in_state = run == "prior_text_tower"
    c.data_text_hidden_states = not c.frozen_in_state
    c.batch_size = 4
    c.learning_rate = 2e-3
    c.warmup_steps = 5
    c.lr_schedule = "constant"
    c.data_overfit = True
    c.clip_stats = "keep"
    c.crop_size = 16
    return c


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_job("test_train_stages.py", tmp_path_factory.mktemp("stages"))


@pytest.mark.parametrize("stage", RUNS)
def test_loss_falls_when_overfitting_a_fixed_batch(results, stage):
    losses = np.array(results[stage]["losses"])
    assert np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-5:].mean()
    assert last < 0.6 * first, f"{stage}: loss went from {first:.4f} to {last:.4f} in {len(losses)} steps"


@pytest.mark.parametrize("stage", STAGES)
def test_nan_in_batch_is_caught_and_skipped(results, stage):
    r = results[stage]["nan"]
    assert r["nonfinite"] is True
    assert r["params_changed"] == 0.0 and r["ema_changed"] == 0.0 and r["opt_state_changed"] == 0.0
    assert r["step_advanced"] is True


def test_decoder_loss_has_both_hybrid_terms(results):
    parts = results["decoder"]["parts"]
    assert set(parts) == {"loss", "loss/mse", "loss/vb", "grad_norm", "learning_rate", "nonfinite"}
    assert parts["loss/vb"] > 0


# ------------------------------------------------------------------------- cheap, in-process behaviour


def test_synthetic_data_is_deterministic_and_resumable():
    from unclip_jax.training.data import SyntheticData, check_batch
    c = tiny_config("decoder")
    a = SyntheticData("decoder", c, seed=3)
    batches = [next(a) for _ in range(3)]
    check_batch("decoder", batches[0], c, c.batch_size)
    b = SyntheticData("decoder", c, seed=3)
    b.set_state(json.loads(json.dumps(a.get_state())))
    nxt = next(a)
    resumed = next(b)
    assert all(np.array_equal(nxt[k], resumed[k]) for k in nxt)
    assert not np.array_equal(batches[0]["image"], batches[1]["image"])
    assert batches[0]["image"].min() >= -1 and batches[0]["image"].max() <= 1


def test_check_batch_names_what_is_wrong():
    from unclip_jax.training.data import SyntheticData, check_batch
    c = tiny_config("prior")
    batch = next(SyntheticData("prior", c))
    batch["image_embeds"] = batch["image_embeds"][:, :5]
    del batch["input_ids"]
    with pytest.raises(ValueError,
                       match=r"missing key 'input_ids'.*image_embeds has shape \(8, 5\), expected \(8, 32\)"):
        check_batch("prior", batch, c, c.batch_size)


def test_overfit_mode_repeats_one_batch_but_advances():
    from unclip_jax.training.data import SyntheticData
    c = tiny_config("upsampler")
    c.data_overfit = True
    s = SyntheticData("upsampler", c)
    assert np.array_equal(next(s)["image"], next(s)["image"]) and s.get_state()["index"] == 2


def test_mesh_sizes_fill_in_minus_one():
    from unclip_jax.training.sharding import mesh_shape
    assert mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    assert mesh_shape(dict(data=1, fsdp=-1, tensor=4), 8) == (1, 2, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ValueError, match="has 4 devices; this job has 8"):
        mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)


def test_learning_rate_warms_up_then_decays():
    from unclip_jax.training.state import learning_rate_schedule
    c = tiny_config("prior")
    c.learning_rate, c.warmup_steps, c.total_steps, c.min_lr_ratio = 1.0, 10, 110, 0.1
    lr = learning_rate_schedule(c)
    assert float(lr(0)) == pytest.approx(0.1)          # step 0 already learns
    assert float(lr(9)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, abs=1e-3)  # cosine half-way
    assert float(lr(110)) == pytest.approx(0.1)


def test_decoder_sample_grid_is_written(results):
    r = results["decoder_samples"]
    assert r["png"] and r["png_size"] == [2 * (16 + 2) + 2, 2 * (16 + 2) + 2]   # 2 rows (sample, target) x 2
    assert r["tensorboard_events"] >= 1


def test_guard_skips_then_stops_and_says_why(caplog):
    from unclip_jax.training.trainer import NonFiniteGuard, NonFiniteLossError
    nan = {"nonfinite": True, "loss": float("nan"), "grad_norm": float("nan")}
    ok = {"nonfinite": False, "loss": 0.1, "grad_norm": 1.0}
    guard = NonFiniteGuard("skip", 2, last_checkpoint=lambda: 8)
    guard(3, nan)
    assert "step 3: loss nan" in caplog.text and "update skipped, parameters unchanged (1 in a row)" in caplog.text
    guard(4, ok)                                   # a good step resets the count
    guard(5, nan)
    with pytest.raises(NonFiniteLossError, match=r"step 6: .*2 non-finite steps in a row, max_nonfinite=2.*"
                                                 r"last checkpoint is step 8"):
        guard(6, nan)
    assert guard.total == 3
    with pytest.raises(NonFiniteLossError, match="on_nonfinite=stop"):
        NonFiniteGuard("stop", 10)(1, nan)


def test_config_errors_name_the_key():
    from unclip_jax.training import config_lib
    c = tiny_config("decoder")
    c.grad_accum_steps = 3
    with pytest.raises(ValueError, match="batch_size=8 is not a multiple of grad_accum_steps=3"):
        config_lib.check(c)


def test_config_checks_the_prediction_type():
    from unclip_jax.training import config_lib
    c = tiny_config("decoder")
    c.prediction_type = "v"
    with pytest.raises(ValueError, match="prediction_type='v'; expected epsilon"):
        config_lib.check(c)
    c = tiny_config("upsampler")
    c.prediction_type = "sample"
    with pytest.raises(ValueError, match="is a decoder setting"):
        config_lib.check(c)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_decoder_stage_samples_and_exports_with_its_prediction_type(tmp_path, prediction_type):
    import jax

    from unclip_jax.diffusion import scheduler as sch
    from unclip_jax.training import stages
    c = tiny_config("decoder")
    c.prediction_type = prediction_type
    stage = stages.build_stage(c)
    assert stage.scheduler.prediction_type == prediction_type == stage.loss_config.prediction_type
    stage.export(stages.init_trained(stage, jax.random.key(0)), tmp_path)
    written = json.loads((tmp_path / "decoder_scheduler" / "scheduler_config.json").read_text())
    assert sch.SchedulerConfig.from_diffusers(written) == stage.scheduler
    assert {p.name for p in tmp_path.iterdir()} == {"decoder", "text_proj", "decoder_scheduler"}


class _Stub:
    """A module stand-in: apply(variables, *args, **kwargs) -> fn(*args)."""

    def __init__(self, fn):
        self.fn = fn

    def apply(self, variables, *args, **kwargs):
        return self.fn(*args)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_decoder_loss_targets_what_the_model_predicts(prediction_type):
    """A decoder that returns exactly the target of its prediction type (the noise, x0, or v = sqrt(abar) eps -
    sqrt(1 - abar) x0) has zero MSE and the true posterior's L_vlb; another type's target is far from it. The
    variance channels are the true posterior's (v = -1 at t > 0)."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.diffusion import scheduler as sch
    from unclip_jax.sampling import TextConditioning
    from unclip_jax.training import losses

    rng = np.random.default_rng(0)
    b, size, d, length = 6, 8, 4, 3
    x0 = jnp.asarray(rng.uniform(-1, 1, (b, size, size, 3)), jnp.float32)
    sched = sch.create_state(sch.DECODER)
    text = TextConditioning(jnp.ones((b, d)), jnp.ones((b, length, d)), jnp.ones((b, length), bool))
    params = {"decoder": {}, "text_proj": {"learned_classifier_free_guidance_embeddings": jnp.zeros((d,))}}
    text_proj = _Stub(lambda z, embeds, hidden, guidance: (jnp.zeros((b, length + 2, d)), jnp.zeros((b, d))))

    def model(kind):
        def fn(x_t, t):
            abar = sch.alpha_bar(sched, t)[:, None, None, None]
            eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
            v = jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0
            pred = {"sample": x0, "epsilon": eps, "v_prediction": v}[kind]
            return jnp.concatenate([pred, -jnp.ones_like(x_t)], axis=-1)
        return _Stub(fn)

    def loss(kind, cfg_kind):
        cfg = losses.LossConfig(text_drop=0.0, image_embed_drop=0.0, prediction_type=cfg_kind)
        total, parts = losses.decoder_loss(model(kind), text_proj, params, x0, jnp.ones((b, d)), text,
                                           jax.random.key(3), sched=sched, cfg=cfg, null_text=text)
        return {k: float(v) for k, v in parts.items()}

    right = loss(prediction_type, prediction_type)
    assert right["mse"] < 1e-5 and abs(right["vb"]) < 1e-3
    for other in {"epsilon", "sample", "v_prediction"} - {prediction_type}:
        assert loss(other, prediction_type)["mse"] > 0.1


def test_clipped_snr_weighting_weighs_the_x0_error_alike_for_every_prediction_type():
    """loss_weighting="clipped_snr": a decoder whose x0 estimate is off by delta_i (per example) has the weighted
    MSE mean_i(delta_i^2 clip(SNR_t_i, 1, gamma)), whether it predicts x0, the equivalent noise or v; "none"
    gives the plain MSE of the prediction type instead (delta^2, SNR delta^2 for the noise, (SNR + 1) delta^2
    for v)."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.diffusion import scheduler as sch
    from unclip_jax.sampling import TextConditioning
    from unclip_jax.training import losses

    rng = np.random.default_rng(1)
    b, size, d, length, gamma = 16, 4, 4, 3, 5.0
    x0 = jnp.asarray(rng.uniform(-1, 1, (b, size, size, 3)), jnp.float32)
    delta = jnp.asarray(rng.uniform(0.05, 0.2, (b, 1, 1, 1)), jnp.float32)
    sched = sch.create_state(sch.DECODER)
    text = TextConditioning(jnp.ones((b, d)), jnp.ones((b, length, d)), jnp.ones((b, length), bool))
    params = {"decoder": {}, "text_proj": {"learned_classifier_free_guidance_embeddings": jnp.zeros((d,))}}
    text_proj = _Stub(lambda z, embeds, hidden, guidance: (jnp.zeros((b, length + 2, d)), jnp.zeros((b, d))))
    seen = []

    def model(kind):
        def fn(x_t, t):
            seen.append(np.asarray(t))
            abar = sch.alpha_bar(sched, t)[:, None, None, None]
            wrong = x0 + delta
            eps = (x_t - jnp.sqrt(abar) * wrong) / jnp.sqrt(1 - abar)
            v = jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * wrong
            pred = {"sample": wrong, "epsilon": eps, "v_prediction": v}[kind]
            return jnp.concatenate([pred, -jnp.ones_like(x_t)], axis=-1)
        return _Stub(fn)

    def parts(kind, weighting):
        cfg = losses.LossConfig(text_drop=0.0, image_embed_drop=0.0, prediction_type=kind, loss_weighting=weighting,
                                snr_gamma=gamma)
        _, out = losses.decoder_loss(model(kind), text_proj, params, x0, jnp.ones((b, d)), text, jax.random.key(5),
                                     sched=sched, cfg=cfg, null_text=text)
        return {k: float(v) for k, v in out.items()}

    x0_loss = parts("sample", "clipped_snr")
    eps_loss = parts("epsilon", "clipped_snr")
    v_loss = parts("v_prediction", "clipped_snr")
    t = seen[-1]
    abar = np.asarray(sched.alphas_cumprod, np.float64)[t]
    snr = abar / (1 - abar)
    assert snr.min() < 1 < gamma < snr.max()                     # the draw exercises both ends of the clip
    d2 = np.asarray(delta, np.float64).ravel() ** 2
    expected = np.mean(d2 * np.clip(snr, 1, gamma))
    np.testing.assert_allclose(x0_loss["weighted_mse"], expected, rtol=1e-4)
    np.testing.assert_allclose(eps_loss["weighted_mse"], expected, rtol=1e-3)
    np.testing.assert_allclose(x0_loss["mse"], np.mean(d2), rtol=1e-4)
    np.testing.assert_allclose(eps_loss["mse"], np.mean(d2 * snr), rtol=1e-3)
    np.testing.assert_allclose(v_loss["weighted_mse"], expected, rtol=1e-3)
    np.testing.assert_allclose(v_loss["mse"], np.mean(d2 * (snr + 1)), rtol=1e-3)
    plain = parts("sample", "none")
    assert "weighted_mse" not in plain and abs(plain["mse"] - x0_loss["mse"]) < 1e-7


def test_config_checks_the_loss_weighting():
    from unclip_jax.training import config_lib
    c = tiny_config("decoder")
    c.loss_weighting = "min_snr"
    with pytest.raises(ValueError, match="loss_weighting='min_snr'; expected none or clipped_snr"):
        config_lib.check(c)
    c.loss_weighting, c.snr_gamma = "clipped_snr", 0.5
    with pytest.raises(ValueError, match="snr_gamma=0.5; expected >= 1"):
        config_lib.check(c)
    c.snr_gamma = 5.0
    config_lib.check(c)
    p = tiny_config("prior")
    p.loss_weighting = "clipped_snr"
    with pytest.raises(ValueError, match="is a decoder setting"):
        config_lib.check(p)


# ------------------------------------------------------------------------------------ subprocess side


def _main(out: Path) -> None:
    import jax
    import jax.numpy as jnp

    from unclip_jax.training import sharding, stages, steps, trainer
    from unclip_jax.training.data import make_source
    from unclip_jax.training.state import TrainState

    results = {}
    for name in RUNS:
        config = small(name)
        stage_name = config.stage
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        stage, tx, _, shardings = trainer.build(config, mesh)
        frozen = stages.init_frozen(stage, config, jax.random.key(1), mesh)
        frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
        in_state = config.frozen_in_state
        state = TrainState(**trainer.initial_state(config, stage, tx, shardings), frozen=frozen if in_state else None)
        source = make_source(config, stage_name)
        batch = next(source)
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        state_sh = TrainState(**shardings, frozen=frozen_sh if in_state else None)
        step = steps.jit_train_step(stage, tx, config, mesh, state_sh, batch_sh, None if in_state else frozen_sh)
        if in_state:
            frozen = None
            assert "text_hidden_states" not in batch
        losses = []
        for _ in range(OVERFIT_STEPS):
            state, m = step(state, sharding.shard_batch(batch, mesh), frozen)
            losses.append(float(m["loss"]))
        parts = {k: float(v) for k, v in m.items()}

        before = jax.device_get(state.checkpointed())
        bad = dict(batch)
        key = "image_embeds" if "image_embeds" in bad else "image"
        bad[key] = bad[key].copy()
        bad[key][0, 0] = np.nan
        state, m = step(state, sharding.shard_batch(bad, mesh), frozen)
        after = jax.device_get(state.checkpointed())
        diff = lambda a, b: float(max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()
                                      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
        if name == "decoder":  # the PNG grid of the decoder's samples (classifier-free guidance on)
            from PIL import Image
            from unclip_jax.training import metrics
            config.num_samples, config.sample_steps, config.sample_guidance = 2, 2, 3.0
            writer = metrics.Writer(out / "decoder_run")
            trainer.write_samples(steps.make_sampler(stage, config), state, jax.tree.map(lambda x: x[:2], batch),
                                  frozen, mesh, 7, out / "decoder_run", writer)
            writer.close()
            png = out / "decoder_run" / "samples" / "step_00000007.png"
            results["decoder_samples"] = {
                "png": png.exists(), "png_size": list(Image.open(png).size) if png.exists() else None,
                "tensorboard_events": len(list((out / "decoder_run" / "tensorboard").glob("events.out.tfevents.*")))}
        results[name] = {"losses": losses, "parts": parts, "nan": {
            "nonfinite": bool(m["nonfinite"]), "params_changed": diff(before["params"], after["params"]),
            "ema_changed": diff(before["ema_params"], after["ema_params"]),
            "opt_state_changed": diff(before["opt_state"], after["opt_state"]),
            "step_advanced": int(after["step"]) == int(before["step"]) + 1}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    del jnp


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
