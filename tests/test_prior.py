"""PriorTransformer and UnCLIPTextProj equal the diffusers reference (float32, random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PriorTransformer as TorchPrior
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

import unclip_jax
from unclip_jax.models import count_params, from_config
from parity import assert_close, randomize_

KARLO_PRIOR = {"_class_name": "PriorTransformer", "attention_head_dim": 64, "embedding_dim": 768,
               "num_attention_heads": 32, "num_embeddings": 77, "num_layers": 20}
KARLO_TEXT_PROJ = {"_class_name": "UnCLIPTextProjModel", "clip_embeddings_dim": 768, "clip_extra_context_tokens": 4,
                   "cross_attention_dim": 1536, "time_embed_dim": 1280}


def small_prior(**overrides):
    cfg = dict(num_attention_heads=3, attention_head_dim=5, num_layers=2, embedding_dim=14, num_embeddings=9,
               additional_embeddings=4)
    cfg.update(overrides)
    return randomize_(TorchPrior(**cfg), seed=1)


def prior_inputs(batch=3, n=9, d=14, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, n), bool)
    mask[0, 5:] = False   # padding hides the last tokens of two of the three prompts
    mask[2, 2:] = False
    return dict(hidden_states=rng.normal(size=(batch, d)).astype(np.float32),
                timestep=np.array([3, 500, 999]),
                proj_embedding=rng.normal(size=(batch, d)).astype(np.float32),
                encoder_hidden_states=rng.normal(size=(batch, n, d)).astype(np.float32),
                attention_mask=mask)


def run_torch_prior(model, inputs):
    with torch.no_grad():
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        return model(**t).predicted_image_embedding


@pytest.mark.parametrize("overrides", [{}, {"norm_in_type": "layer", "embedding_proj_norm_type": "layer",
                                            "time_embed_act_fn": "gelu", "time_embed_dim": 11}])
def test_prior_matches_diffusers(tmp_path, overrides):
    ref = small_prior(**overrides)
    ref.save_pretrained(tmp_path / "prior")
    module, params = unclip_jax.load_component(tmp_path, "prior")
    inputs = prior_inputs()
    expected = run_torch_prior(ref, inputs)
    out = module.apply({"params": params}, **inputs)
    assert_close(out, expected)
    assert float(np.std(expected.numpy())) > 0.1  # a non-trivial reference


def test_prior_unnormalize_uses_clip_mean_and_std(tmp_path):
    ref = small_prior()
    ref.save_pretrained(tmp_path / "prior")
    module, params = unclip_jax.load_component(tmp_path, "prior")
    x = np.random.default_rng(0).normal(size=(2, 14)).astype(np.float32)
    expected = ref.post_process_latents(torch.from_numpy(x)).detach()
    assert_close(module.apply({"params": params}, x, method=module.unnormalize), expected)
    back = module.apply({"params": params}, expected.numpy(), method=module.normalize)
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_text_proj_matches_diffusers(tmp_path):
    ref = randomize_(UnCLIPTextProjModel(clip_extra_context_tokens=3, clip_embeddings_dim=10, time_embed_dim=12,
                                         cross_attention_dim=14), seed=2)
    ref.save_pretrained(tmp_path / "text_proj")
    module, params = unclip_jax.load_component(tmp_path, "text_proj")
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 10)).astype(np.float32)
    for cfg in (False, True):
        b = 4 if cfg else 2
        prompt = rng.normal(size=(b, 10)).astype(np.float32)
        hidden = rng.normal(size=(b, 7, 10)).astype(np.float32)
        with torch.no_grad():
            ctx, add = ref(image_embeddings=torch.from_numpy(image), prompt_embeds=torch.from_numpy(prompt),
                           text_encoder_hidden_states=torch.from_numpy(hidden), do_classifier_free_guidance=cfg)
        jctx, jadd = module.apply({"params": params}, image, prompt, hidden, cfg)
        assert_close(jctx, ctx, what="encoder_hidden_states")
        assert_close(jadd, add, what="additive_clip_time_embeddings")


def test_karlo_sizes_have_the_reference_parameter_counts():
    assert count_params(from_config("prior", KARLO_PRIOR)) == 1_022_030_080
    assert count_params(from_config("text_proj", KARLO_TEXT_PROJ)) == 7_878_400


def test_round_trip_through_diffusers(tmp_path):
    module = from_config("prior", small_prior().config)
    params = unclip_jax.models.init_params(module, jax.random.key(3))
    # Give the zero-initialised tables values, so the round trip checks them too.
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(4), p.shape), params)
    unclip_jax.save_component(tmp_path, "prior", module, params)
    ref = TorchPrior.from_pretrained(tmp_path / "prior").eval()
    inputs = prior_inputs()
    assert_close(module.apply({"params": params}, **inputs), run_torch_prior(ref, inputs))
    _, again = unclip_jax.load_component(tmp_path, "prior")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)  # exact


def test_unsupported_prior_option_is_rejected():
    with pytest.raises(ValueError, match="added_emb_type"):
        from_config("prior", {**KARLO_PRIOR, "added_emb_type": "something"})
    with pytest.raises(ValueError, match="not_an_option"):
        from_config("prior", {**KARLO_PRIOR, "not_an_option": 3})


def test_wrong_shaped_prior_input_names_the_expected_shape(tmp_path):
    module = from_config("prior", small_prior().config)
    params = unclip_jax.models.init_params(module, jax.random.key(0))
    inputs = prior_inputs()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :5]
    with pytest.raises(ValueError, match=r"encoder_hidden_states has shape \(3, 5, 14\); expected \(3, 9, 14\)"):
        module.apply({"params": params}, **inputs)


def test_prior_runs_in_bfloat16_close_to_float32(tmp_path):
    ref = small_prior()
    ref.save_pretrained(tmp_path / "prior")
    module, params = unclip_jax.load_component(tmp_path, "prior", dtype=jnp.bfloat16)
    inputs = prior_inputs()
    out = np.asarray(module.apply({"params": params}, **inputs))
    expected = run_torch_prior(ref, inputs).numpy()
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.max(np.abs(out - expected)) < 0.05 * np.max(np.abs(expected)) + 0.05
