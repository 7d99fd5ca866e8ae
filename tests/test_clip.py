"""CLIP text and image towers: parity with transformers, checkpoint round trips, Karlo sizes, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from parity import assert_close, nchw, randomize_, to_numpy
from unclip_jax.convert import convert_state, load_component, save_component
from unclip_jax.models import abstract_params, count_params
from unclip_jax.models.clip import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                                    CLIPVisionModelWithProjection)

# Small, deliberately uneven sizes: 3 heads of 16, odd vocab, 13 positions.
TEXT = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=80, vocab_size=99,
            max_position_embeddings=13, projection_dim=20, bos_token_id=0)
VISION = dict(image_size=30, patch_size=6, hidden_size=40, num_attention_heads=2, num_hidden_layers=2,
              intermediate_size=56, projection_dim=12)
KARLO_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408, projection_dim=768,
                  eos_token_id=2)
KARLO_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    patch_size=14, image_size=224, projection_dim=768)


def _padded_batch(rng, length, lengths, low=0):
    """Random ids (B, length) with right padding (pad id 0) after `lengths` tokens; mask 1 = token."""
    ids = rng.integers(low, TEXT["vocab_size"], size=(len(lengths), length))
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


def _run_torch_text(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.text_embeds, out.last_hidden_state


def _random_params(module, seed=0):
    """Random params of the module's shapes (no init to compile): weights ~ N(0, 1/fan_in), the rest O(1)."""
    rng = np.random.default_rng(seed)
    shapes, _ = abstract_params(module)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, fan_in ** -0.5, leaf.shape).astype(np.float32)
        if name == "scale":
            return (1 + 0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
        scale = 0.5 if name in ("embedding", "class_embedding") else 0.1
        return (scale * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("hidden_act,length", [("quick_gelu", 13), ("gelu", 11)])
def test_text_matches_transformers_with_legacy_argmax_pooling(tmp_path, hidden_act, length):
    ref = randomize_(transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TEXT, hidden_act=hidden_act, eos_token_id=2)))
    ref.save_pretrained(tmp_path / "text_encoder")
    module, params = load_component(tmp_path, "text_encoder")
    assert module.config.eos_token_id == 2 and module.config.hidden_act == hidden_act

    ids, mask = _padded_batch(np.random.default_rng(0), length, [length, 7, 3])
    ids[1, 2] = ids[1, 5] = TEXT["vocab_size"] - 1  # a tie: the first largest id is pooled
    out = jax.jit(module.apply)({"params": params}, ids, mask)
    embeds, hidden = _run_torch_text(ref, ids, mask)
    assert_close(out.text_embeds, embeds, what="text_embeds")
    assert_close(out.last_hidden_state, hidden, what="last_hidden_state")  # padded positions agree too


def test_text_pools_at_the_first_eos_token(tmp_path):
    eos = 5
    ref = randomize_(transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TEXT, eos_token_id=eos, pad_token_id=eos)))
    ref.save_pretrained(tmp_path / "text_encoder")
    module, params = load_component(tmp_path, "text_encoder")

    length, lengths = 13, [13, 8, 4]
    ids, mask = _padded_batch(np.random.default_rng(1), length, lengths, low=eos + 1)
    for row, n in enumerate(lengths):
        ids[row, n - 1] = eos
        ids[row, n:] = eos  # padding with the eos id itself: the first one still wins
    ids[0, 9] = eos  # an early eos in a full row
    first_eos = np.array([9, 7, 3])
    assert (ids.argmax(-1) != first_eos).all(), "the test must tell eos pooling from argmax pooling"

    out = jax.jit(module.apply)({"params": params}, ids, mask)
    embeds, hidden = _run_torch_text(ref, ids, mask)
    assert_close(out.text_embeds, embeds, what="text_embeds")
    assert_close(out.last_hidden_state, hidden, what="last_hidden_state")
    pooled_rows = np.asarray(out.last_hidden_state)[[0, 1, 2], first_eos]
    np.testing.assert_array_equal(np.asarray(out.pooler_output), pooled_rows)


def test_text_attention_mask_defaults_to_all_tokens(tmp_path):
    ref = randomize_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT, eos_token_id=2)))
    ref.save_pretrained(tmp_path / "text_encoder")
    module, params = load_component(tmp_path, "text_encoder")
    ids = np.random.default_rng(2).integers(0, TEXT["vocab_size"], size=(2, 13))
    out = jax.jit(module.apply)({"params": params}, ids)
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids))
    assert_close(out.text_embeds, expected.text_embeds)
    assert_close(out.last_hidden_state, expected.last_hidden_state)


def test_text_left_padding_matches_on_real_tokens(tmp_path):
    # Padded queries before the first real token see no key at all; transformers' eager attention then averages
    # every value (as ours does) and its sdpa path returns something else, so only real tokens are specified.
    ref = randomize_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT, eos_token_id=2)))
    ref.save_pretrained(tmp_path / "text_encoder")
    module, params = load_component(tmp_path, "text_encoder")
    ids, mask = _padded_batch(np.random.default_rng(10), 13, [13, 9])
    ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # pad id 0 never wins the argmax
    out = jax.jit(module.apply)({"params": params}, ids, mask)
    embeds, hidden = _run_torch_text(ref, ids, mask)
    assert_close(out.text_embeds, embeds, what="text_embeds")
    real = mask.astype(bool)
    assert_close(np.asarray(out.last_hidden_state)[real], to_numpy(hidden)[real], what="last_hidden_state")


def test_legacy_position_ids_buffer_is_ignored():
    ref = randomize_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)))
    state = dict(ref.state_dict(), **{"text_model.embeddings.position_ids": torch.arange(13)[None]})
    module = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT))
    params = convert_state(module, state)
    np.testing.assert_array_equal(params["text_projection"]["kernel"], to_numpy(ref.text_projection.weight).T)


def test_vision_matches_transformers_nhwc(tmp_path):
    ref = randomize_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)))
    ref.save_pretrained(tmp_path / "image_encoder")
    module, params = load_component(tmp_path, "image_encoder")
    pixels = np.random.default_rng(3).normal(size=(2, 30, 30, 3)).astype(np.float32)
    out = jax.jit(module.apply)({"params": params}, pixels)
    with torch.no_grad():
        expected = ref(pixel_values=nchw(pixels))
    assert out.last_hidden_state.shape == (2, 1 + 25, 40)
    assert_close(out.image_embeds, expected.image_embeds, what="image_embeds")
    assert_close(out.last_hidden_state, expected.last_hidden_state, what="last_hidden_state")


def test_full_clip_checkpoint_loads_as_either_tower(tmp_path):
    config = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=2), vision_config=VISION,
                                     projection_dim=16)
    ref = randomize_(transformers.CLIPModel(config))
    ref.save_pretrained(tmp_path / "text_encoder")
    ref.save_pretrained(tmp_path / "image_encoder")
    text, text_params = load_component(tmp_path, "text_encoder")
    vision, vision_params = load_component(tmp_path, "image_encoder")
    assert text.config.projection_dim == vision.config.projection_dim == 16

    ids, mask = _padded_batch(np.random.default_rng(4), 13, [13, 6])
    pixels = np.random.default_rng(5).normal(size=(2, 30, 30, 3)).astype(np.float32)
    with torch.no_grad():
        text_ref = ref.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        image_ref = ref.get_image_features(pixel_values=nchw(pixels))
    assert_close(jax.jit(text.apply)({"params": text_params}, ids, mask).text_embeds, text_ref.pooler_output)
    assert_close(jax.jit(vision.apply)({"params": vision_params}, pixels).image_embeds, image_ref.pooler_output)


def test_text_round_trip_through_transformers(tmp_path):
    module = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, hidden_act="gelu", eos_token_id=7))
    params = _random_params(module, 0)
    folder = save_component(tmp_path, "text_encoder", module, params)
    ref, info = transformers.CLIPTextModelWithProjection.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = _padded_batch(np.random.default_rng(6), 13, [13, 9])
    ids[:, 8] = 7
    out = jax.jit(module.apply)({"params": params}, ids, mask)
    embeds, hidden = _run_torch_text(ref.eval(), ids, mask)
    assert_close(out.text_embeds, embeds)
    assert_close(out.last_hidden_state, hidden)


def test_vision_round_trip_through_transformers(tmp_path):
    module = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))
    params = _random_params(module, 1)
    folder = save_component(tmp_path, "image_encoder", module, params)
    ref, info = transformers.CLIPVisionModelWithProjection.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pixels = np.random.default_rng(7).normal(size=(1, 30, 30, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref.eval()(pixel_values=nchw(pixels))
    out = jax.jit(module.apply)({"params": params}, pixels)
    assert_close(out.image_embeds, expected.image_embeds)
    assert_close(out.last_hidden_state, expected.last_hidden_state)


def test_configs_read_transformers_json_and_round_trip():
    text = transformers.CLIPTextConfig(**TEXT, eos_token_id=2).to_dict()
    text.update(_name_or_path="openai/clip-vit-large-patch14", torch_dtype="float32", dropout=0.0)
    ours = CLIPTextConfig.from_dict(text)
    assert ours == CLIPTextConfig(**TEXT, eos_token_id=2)
    assert CLIPTextConfig.from_dict(ours.to_dict()) == ours
    assert CLIPVisionConfig.from_dict(transformers.CLIPVisionConfig(**VISION).to_dict()) == CLIPVisionConfig(**VISION)
    full = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=20).to_dict()
    assert CLIPTextConfig.from_dict(full).hidden_size == 48
    assert CLIPVisionConfig.from_dict(full).hidden_size == 40
    legacy = {"model_type": "clip", "projection_dim": 20, "text_config": None, "text_config_dict": TEXT}
    assert CLIPTextConfig.from_dict(legacy) == CLIPTextConfig(**TEXT)


def test_karlo_sizes_have_the_published_parameter_counts():
    text = CLIPTextModelWithProjection(CLIPTextConfig(**KARLO_TEXT))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**KARLO_VISION))
    assert count_params(text) == 123_650_304
    assert count_params(vision) == 303_966_208
    with torch.device("meta"):
        ref_text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**KARLO_TEXT))
        ref_vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**KARLO_VISION))
    assert sum(p.numel() for p in ref_text.parameters()) == 123_650_304
    assert sum(p.numel() for p in ref_vision.parameters()) == 303_966_208


def test_unsupported_config_values_are_named():
    with pytest.raises(ValueError, match="hidden_act='gelu_10'"):
        CLIPTextConfig.from_dict(dict(TEXT, hidden_act="gelu_10"))
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPTextConfig.from_dict(dict(TEXT, eos_token_id=[2, 3]))
    with pytest.raises(ValueError, match="image_size"):
        CLIPVisionConfig.from_dict(dict(VISION, image_size=[30, 30]))
    with pytest.raises(ValueError, match="model_type='clip_vision_model'"):
        CLIPTextConfig.from_dict(transformers.CLIPVisionConfig(**VISION).to_dict())


def test_too_many_tokens_is_a_clear_error():
    module = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT))
    with pytest.raises(ValueError, match=r"input_ids has shape \(1, 14\); expected \(B, L\) with L <= 13"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 14), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 12\)"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 13), jnp.int32), jnp.ones((1, 12)))


@pytest.mark.parametrize("shape,message", [
    ((1, 3, 30, 30), r"expected \(\?, 30, 30, 3\).*channels-first"),
    ((1, 28, 28, 3), r"pixel_values has shape \(1, 28, 28, 3\); expected \(\?, 30, 30, 3\).*30 px"),
])
def test_bad_pixel_values_are_a_clear_error(shape, message):
    module = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))


def test_bfloat16_compute_stays_close_to_float32():
    text = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, eos_token_id=2))
    text_params = _random_params(text, 2)
    ids, mask = _padded_batch(np.random.default_rng(8), 13, [13, 5])
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))
    vision_params = _random_params(vision, 3)
    pixels = np.random.default_rng(9).normal(size=(2, 30, 30, 3)).astype(np.float32)

    for module, params, args, fields in ((text, text_params, (ids, mask), ("text_embeds", "last_hidden_state")),
                                         (vision, vision_params, (pixels,), ("image_embeds", "last_hidden_state"))):
        full = jax.jit(module.apply)({"params": params}, *args)
        half = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, *args)
        for field in fields:
            assert getattr(half, field).dtype == jnp.bfloat16
            assert_close(to_numpy(getattr(half, field).astype(jnp.float32)), getattr(full, field), tol=5e-2,
                         what=f"{type(module).__name__}.{field}")
