"""The decoder / upsampler UNet against diffusers' UNet2DConditionModel and UNet2DModel."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from parity import assert_close, nchw, nhwc, randomize_
from unclip_jax.convert import load_component, save_component
from unclip_jax.models import abstract_params, count_params, from_config
from unclip_jax.models.unet import (DIFFUSERS_DEFAULTS, IMPLEMENTED, KARLO_DECODER_CONFIG, KARLO_SUPER_RES_CONFIG,
                                    NO_EFFECT, UNet, UNetConfig)

REFERENCE = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel}

# Karlo's decoder options at toy sizes: 48 channels with head dim 8 gives 6 heads; 20-wide context.
SMALL_DECODER = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32, 48), layers_per_block=2,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8, cross_attention_dim=20,
    class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", only_cross_attention=False)

# Fewer blocks still: for the tests that only need some cross-attention UNet.
TINY_DECODER = dict(SMALL_DECODER, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"))

# One resolution (resnets + added-KV attention, no resampling): for numerics and training-mode tests.
MICRO_DECODER = dict(SMALL_DECODER, block_out_channels=(16,), layers_per_block=1,
                     down_block_types=("SimpleCrossAttnDownBlock2D",), up_block_types=("SimpleCrossAttnUpBlock2D",))

SMALL_SUPER_RES = dict(
    sample_size=16, in_channels=6, out_channels=3, block_out_channels=(16, 24, 32), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3,
    mid_block_type="UNetMidBlock2D", add_attention=False, attention_head_dim=None,
    resnet_time_scale_shift="default", time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
    norm_num_groups=8, norm_eps=1e-5)


def _inputs(cfg: UNetConfig, batch=2, size=16, tokens=7, seed=0):
    rng = np.random.default_rng(seed)
    inputs = {"sample": rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32),
              "timestep": np.array([3, 917][:batch], np.int64)}
    if cfg.has_cross_attention:
        inputs["encoder_hidden_states"] = rng.standard_normal((batch, tokens, cfg.context_dim)).astype(np.float32)
        mask = np.ones((batch, tokens), bool)
        mask[0, tokens - 3:] = False  # the first example hides its last 3 context tokens
        inputs["attention_mask"] = mask
    if cfg.class_embed_type == "identity":
        inputs["class_labels"] = rng.standard_normal((batch, cfg.time_embed_dim)).astype(np.float32)
    return inputs


def _torch_forward(model, inputs, timestep=None):
    t = torch.from_numpy(np.asarray(inputs["timestep"] if timestep is None else timestep))
    kwargs = {}
    if "class_labels" in inputs:
        kwargs["class_labels"] = torch.from_numpy(inputs["class_labels"])
    if isinstance(model, UNet2DConditionModel):
        kwargs["encoder_hidden_states"] = torch.from_numpy(inputs["encoder_hidden_states"])
        if inputs.get("attention_mask") is not None:
            kwargs["attention_mask"] = torch.from_numpy(inputs["attention_mask"])
    with torch.no_grad():
        return nhwc(model(nchw(inputs["sample"]), t, **kwargs).sample)


# XLA compiles slowly on CPU: one compilation per (architecture, input shapes), shared by every test, with
# LLVM's slow passes off (about 2x faster to compile; the numerics are the same).
@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("deterministic",),
                   compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
def _apply(module, params, inputs, deterministic=True, rngs=None):
    return module.apply({"params": params}, **inputs, deterministic=deterministic, rngs=rngs)


def _jax_forward(module, params, inputs, timestep=None, **kw):
    inputs = dict(inputs, timestep=inputs["timestep"] if timestep is None else timestep)
    return np.asarray(_apply(module, params, inputs, **kw).astype(jnp.float32))


def _random_params(module, seed=0):
    """Random, non-trivial Flax params (numpy, no XLA compilation): kernels ~ N(0, 1/fan_in), norm
    scales ~ 1 + 0.2 N, biases ~ 0.1 N."""
    shapes, _ = abstract_params(module)
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            return rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(np.prod(x.shape[:-1]))
        if name == "scale":
            return (1 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _check_parity(module, params, reference, inputs):
    for timestep in (None, np.array(500)):  # per-example (B,) and one scalar for the batch
        expected = _torch_forward(reference, inputs, timestep)
        assert np.abs(expected).mean() > 0.1, "reference output is trivially small"
        assert_close(_jax_forward(module, params, inputs, timestep), expected, tol=1e-4)


# ------------------------------------------------------------------------------------------ parity


def test_decoder_matches_diffusers_unet2dconditionmodel(tmp_path):
    reference = randomize_(UNet2DConditionModel(**SMALL_DECODER))
    reference.save_pretrained(tmp_path / "decoder")
    module, params = load_component(tmp_path, "decoder")
    inputs = _inputs(module.config)
    _check_parity(module, params, reference, inputs)
    # The mask matters: an all-True mask is the reference without one, and differs from the partial mask.
    unmasked = _jax_forward(module, params, dict(inputs, attention_mask=np.ones_like(inputs["attention_mask"])))
    assert_close(unmasked, _torch_forward(reference, dict(inputs, attention_mask=None)), tol=1e-4)
    assert np.abs(unmasked - _jax_forward(module, params, inputs)).max() > 1e-3


def test_super_res_matches_diffusers_unet2dmodel(tmp_path):
    reference = randomize_(UNet2DModel(**SMALL_SUPER_RES))
    reference.save_pretrained(tmp_path / "super_res_first")
    module, params = load_component(tmp_path, "super_res_first")
    assert module.config.reference_class == "UNet2DModel" and not module.config.has_cross_attention
    _check_parity(module, params, reference, _inputs(module.config))


@pytest.mark.parametrize("name, config", [
    # the less common UNet2DConditionModel options we implement, all at once
    ("decoder", dict(SMALL_DECODER, layers_per_block=(1, 2, 1), attention_head_dim=(8, 8, 16),
                     only_cross_attention=(False, True, False), mid_block_only_cross_attention=False,
                     cross_attention_dim=32, cross_attention_norm="group_norm", resnet_skip_time_act=True,
                     resnet_out_scale_factor=1.5, mid_block_scale_factor=2.0, time_embedding_act_fn="silu",
                     time_embedding_dim=40, conv_in_kernel=5, conv_out_kernel=1, center_input_sample=True,
                     act_fn="mish")),
    # UNet2DModel with self-attention in the mid block and an additive class embedding
    ("super_res_first", dict(SMALL_SUPER_RES, add_attention=True, attention_head_dim=8, attn_norm_num_groups=4,
                             class_embed_type="identity", act_fn="gelu", mid_block_scale_factor=2.0)),
])
def test_saved_params_load_in_diffusers_with_identical_outputs(tmp_path, name, config):
    cls = UNet2DConditionModel if name == "decoder" else UNet2DModel
    module = from_config(name, dict(cls(**config).config, _class_name=cls.__name__))
    params = _random_params(module)
    folder = save_component(tmp_path, name, module, params)
    reference = cls.from_pretrained(folder).eval()
    assert dict(reference.config) == {**dict(reference.config), **module.config.to_dict()}
    inputs = _inputs(module.config)
    if name == "decoder":  # diffusers cannot mask with only_cross_attention (its padded mask is too long)
        inputs["attention_mask"] = None
    expected = _torch_forward(reference, inputs)
    assert np.abs(expected).mean() > 0.1
    assert_close(_jax_forward(module, params, inputs), expected, tol=1e-4)


# ------------------------------------------------------------------------------------------ Karlo sizes


def test_karlo_parameter_counts():
    decoder = from_config("decoder", KARLO_DECODER_CONFIG)
    super_res = from_config("super_res_first", KARLO_SUPER_RES_CONFIG)
    assert count_params(decoder) == 885_439_686
    assert count_params(super_res) == 691_579_523
    with torch.device("meta"):  # the reference agrees, without allocating anything
        for config, expected in ((KARLO_DECODER_CONFIG, 885_439_686), (KARLO_SUPER_RES_CONFIG, 691_579_523)):
            ref = REFERENCE[config["_class_name"]](**{k: v for k, v in config.items() if not k.startswith("_")})
            assert sum(p.numel() for p in ref.parameters()) == expected


def test_karlo_configs_round_trip_through_to_dict():
    for config in (KARLO_DECODER_CONFIG, KARLO_SUPER_RES_CONFIG):
        cfg = UNetConfig.from_dict(config)
        assert UNetConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.to_dict()["_class_name"] == config["_class_name"]
    assert UNetConfig() == UNetConfig.from_dict(KARLO_DECODER_CONFIG)  # the defaults are Karlo's decoder


def test_config_without_class_name_is_told_apart_by_its_keys():
    strip = lambda d: {k: v for k, v in d.items() if k != "_class_name"}
    assert UNetConfig.from_dict(strip(KARLO_DECODER_CONFIG)).reference_class == "UNet2DConditionModel"
    assert UNetConfig.from_dict(strip(KARLO_SUPER_RES_CONFIG)).reference_class == "UNet2DModel"


# ------------------------------------------------------------------------------------------ strict configs


def _another_value(default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, str):
        return default + "_other"
    if default is None:
        return 3
    raise AssertionError(f"no alternative for {default!r}")


@pytest.mark.parametrize("cls", [UNet2DConditionModel, UNet2DModel])
def test_every_diffusers_argument_is_implemented_or_checked(cls):
    name = cls.__name__
    signature = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    freeze = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    assert {k: freeze(v) for k, v in signature.items()} == DIFFUSERS_DEFAULTS[name]
    assert set(IMPLEMENTED[name]) | set(NO_EFFECT[name]) <= set(signature)
    base = KARLO_DECODER_CONFIG if name == "UNet2DConditionModel" else KARLO_SUPER_RES_CONFIG
    for key, default in signature.items():
        if key in IMPLEMENTED[name] or key in NO_EFFECT[name]:
            continue
        with pytest.raises(ValueError, match=f"does not support {key}="):
            UNetConfig.from_dict(dict(base, **{key: _another_value(default)}))
        UNetConfig.from_dict(dict(base, **{key: default}))  # the default itself is fine


@pytest.mark.parametrize("base, key, value", [
    (KARLO_DECODER_CONFIG, "down_block_types", ["CrossAttnDownBlock2D"] * 4),
    (KARLO_DECODER_CONFIG, "up_block_types", ["UpBlock2D"] * 4),
    (KARLO_DECODER_CONFIG, "mid_block_type", "UNetMidBlock2DCrossAttn"),
    (KARLO_DECODER_CONFIG, "class_embed_type", "timestep"),
    (KARLO_DECODER_CONFIG, "resnet_time_scale_shift", "spatial"),
    (KARLO_DECODER_CONFIG, "time_embedding_type", "fourier"),
    (KARLO_DECODER_CONFIG, "encoder_hid_dim", 768),
    (KARLO_SUPER_RES_CONFIG, "down_block_types", ["AttnDownBlock2D"] * 4),
    (KARLO_SUPER_RES_CONFIG, "num_class_embeds", 10),
])
def test_unsupported_option_raises_naming_it(base, key, value):
    with pytest.raises(ValueError, match=key) as err:
        UNetConfig.from_dict(dict(base, **{key: value}))
    assert str(value[0] if isinstance(value, list) else value) in str(err.value)


def test_option_with_no_effect_on_these_blocks_is_accepted():
    cfg = UNetConfig.from_dict(dict(KARLO_DECODER_CONFIG, downsample_padding=0, use_linear_projection=True))
    assert "downsample_padding" not in cfg.to_dict()


# ------------------------------------------------------------------------------------------ inputs


def _decoder(config):
    module = UNet(UNetConfig.from_dict(dict(config, _class_name="UNet2DConditionModel")))
    return module, _random_params(module)


@pytest.fixture(scope="module")
def small_decoder():
    return _decoder(TINY_DECODER)


@pytest.fixture(scope="module")
def micro_decoder():
    return _decoder(MICRO_DECODER)


def test_nchw_sample_is_rejected_with_the_expected_shape(small_decoder):
    module, params = small_decoder
    inputs = _inputs(module.config)
    inputs["sample"] = inputs["sample"].transpose(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"sample has shape \(2, 3, 16, 16\); expected \(\?, \?, \?, 3\).*NCHW"):
        _jax_forward(module, params, inputs)


@pytest.mark.parametrize("change, message", [
    (dict(attention_mask=np.ones((2, 5), bool)), r"attention_mask has shape \(2, 5\); expected \(2, 7\)"),
    (dict(encoder_hidden_states=None), "pass encoder_hidden_states"),
    (dict(encoder_hidden_states=np.zeros((2, 7, 21), np.float32)), r"expected \(2, \?, 20\)"),
    (dict(class_labels=None), "pass class_labels"),
    (dict(class_labels=np.zeros((2, 32), np.float32)), r"class_labels has shape \(2, 32\); expected \(2, 64\)"),
    (dict(sample=np.zeros((2, 17, 16, 3), np.float32)), "multiples of 2"),
    (dict(timestep=np.zeros((3,))), r"timestep has shape \(3,\)"),
])
def test_bad_inputs_raise_clear_errors(small_decoder, change, message):
    module, params = small_decoder
    with pytest.raises(ValueError, match=message):
        _jax_forward(module, params, dict(_inputs(module.config), **change))


# ------------------------------------------------------------------------------------------ numerics, training


def test_bfloat16_is_finite_and_close_to_float32(micro_decoder):
    module, params = micro_decoder
    inputs = _inputs(module.config)
    out32 = _jax_forward(module, params, inputs)
    out16 = _jax_forward(module.clone(dtype=jnp.bfloat16), params, inputs)
    assert np.isfinite(out16).all()
    assert np.abs(out16 - out32).max() <= 0.05 * np.abs(out32).max() + 0.05


def test_remat_checkpoints_every_resnet_and_attention_block(micro_decoder):
    module, params = micro_decoder
    inputs = _inputs(module.config)
    remat = module.clone(remat=True)
    assert jax.tree_util.tree_structure(abstract_params(remat)[0]) == jax.tree_util.tree_structure(params)

    def checkpoints(m, deterministic):  # traced only (XLA compiles slowly on CPU)
        loss = lambda p: jnp.mean(m.apply({"params": p}, **inputs, deterministic=deterministic,
                                          rngs={"dropout": jax.random.key(0)}) ** 2)
        jax.make_jaxpr(jax.grad(loss))(params)  # differentiable in both modes
        return sum(e.primitive.name.startswith(("remat", "checkpoint")) for e in jax.make_jaxpr(loss)(params).eqns)

    # MICRO_DECODER: 1 down resnet + attention, mid 2 resnets + attention, up 2 resnets + 2 attentions.
    assert checkpoints(remat, True) == checkpoints(remat, False) == 9
    assert checkpoints(module, True) == 0


def test_dropout_applies_only_when_not_deterministic(micro_decoder):
    module, params = micro_decoder
    inputs = _inputs(module.config)
    drop = module.clone(config=dataclasses.replace(module.config, dropout=0.5))
    trace = lambda m: str(jax.make_jaxpr(lambda p: m.apply({"params": p}, **inputs))(params))
    assert trace(drop) == trace(module)  # deterministic: exactly the computation without dropout
    noisy = _jax_forward(drop, params, inputs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.abs(noisy - _jax_forward(module, params, inputs)).max() > 1e-2
