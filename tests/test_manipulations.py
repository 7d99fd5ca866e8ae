"""The paper's image manipulations (section 3) on a tiny random-weight unCLIP stack: slerp's geometry,
DDIM inversion and reconstruction, variations, interpolations, text diffs, the best-of-N prior,
inpainting, and the errors bad input gets.

Random weights make the decoder no denoiser: its eps changes with its input at an O(1) rate at every
noise level, so DDIM inversion (which evaluates eps at x_prev instead of x_t) is only accurate where
sigma = sqrt((1 - abar) / abar) stays small. The reconstruction tests therefore stop the schedule at
t = 500 (sigma = 1.0) and decode without clipping x0 (the library's default for inverted latents):
there the error is DDIM's first-order error, which shrinks as the step count grows.
"""

import copy
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tiny_unclip
import unclip_jax
from unclip_jax import manipulations as M
from unclip_jax.diffusion import scheduler as sch
from unclip_jax.manipulations import mixin

ROW = dict(super_res_num_inference_steps=2, output_type="np")   # every row decodes with these: one compile
INVERT = dict(num_inference_steps=16, max_timestep=500)


def smooth_image(seed, size=40):
    """A smooth random RGB image (H, W, 3) in [0, 1]: bicubic upsampling of 4x4 random colours."""
    base = np.random.default_rng(seed).uniform(0, 1, (1, 4, 4, 3)).astype(np.float32)
    return np.clip(np.asarray(jax.image.resize(base, (1, size, size, 3), "cubic"))[0], 0, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_unclip")
    tiny_unclip.build(root)
    return root


@pytest.fixture(scope="module")
def pipe(root):
    return unclip_jax.UnCLIPImageVariationPipeline.from_pretrained(root / "variation")


@pytest.fixture(scope="module")
def t2i(root):
    return unclip_jax.UnCLIPPipeline.from_pretrained(root / "unclip")


@pytest.fixture(scope="module")
def images():
    return [smooth_image(i) for i in range(3)]


@pytest.fixture(scope="module")
def latent(pipe, images):
    return pipe.invert(images, **INVERT)


@pytest.fixture(scope="module")
def reconstruction(pipe, latent):
    return pipe.reconstruct(latent, rng=1, **ROW)


def unit(pixels):
    return np.asarray(pixels) * 0.5 + 0.5


def angle(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.arccos(np.clip(cos, -1, 1))


# ---------------------------------------------------------------------------------------------- slerp


def test_slerp_ends_are_exact():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(16).astype(np.float32) * 3, rng.standard_normal(16).astype(np.float32)
    row = np.asarray(M.slerp(a, b, jnp.array([0.0, 0.3, 1.0])))
    np.testing.assert_array_equal(row[0], a)
    np.testing.assert_array_equal(row[2], b)


def test_slerp_angle_is_linear_in_t_and_the_norm_interpolates():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(16) * 2.5, rng.standard_normal(16) * 0.5
    t = np.linspace(0, 1, 11)
    row = np.asarray(M.slerp(a, b, t), np.float64)
    np.testing.assert_allclose(angle(a, row), t * angle(a, b), atol=1e-5)
    np.testing.assert_allclose(angle(row, b), (1 - t) * angle(a, b), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(row, axis=-1), (1 - t) * np.linalg.norm(a) + t * np.linalg.norm(b),
                               rtol=1e-5)
    # On the great circle through a and b: in their plane.
    basis, _ = np.linalg.qr(np.stack([a, b], 1))
    np.testing.assert_allclose(row - row @ basis @ basis.T, 0, atol=1e-5)


def test_slerp_of_unit_vectors_is_the_textbook_formula():
    rng = np.random.default_rng(2)
    a, b = (x / np.linalg.norm(x) for x in rng.standard_normal((2, 16)))
    w = np.arccos(a @ b)
    t = np.linspace(0, 1, 7)[:, None]
    expected = np.sin((1 - t) * w) / np.sin(w) * a + np.sin(t * w) / np.sin(w) * b
    np.testing.assert_allclose(M.slerp(a, b, t[:, 0]), expected, atol=1e-6)


def test_slerp_has_no_nan_for_parallel_or_antiparallel_inputs():
    a = np.random.default_rng(3).standard_normal(16).astype(np.float32)
    t = np.linspace(0, 1, 9)
    parallel = np.asarray(M.slerp(a, 3 * a, t))
    assert np.isfinite(parallel).all()
    np.testing.assert_allclose(angle(a, parallel), 0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(parallel, axis=-1), (1 + 2 * t) * np.linalg.norm(a), rtol=1e-5)
    nearly = np.asarray(M.slerp(a, a + 1e-7, t))
    assert np.isfinite(nearly).all() and np.allclose(nearly, a, atol=1e-5)
    antiparallel = np.asarray(M.slerp(a, -a, t))
    assert np.isfinite(antiparallel).all()
    np.testing.assert_allclose(angle(a, antiparallel), t * np.pi, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(antiparallel, axis=-1), np.linalg.norm(a), rtol=1e-5)
    np.testing.assert_array_equal(antiparallel[-1], -a)
    same = np.asarray(M.slerp(a, a, t))
    np.testing.assert_array_equal(same, np.broadcast_to(a, same.shape))  # bit for bit: identical rows
    assert np.isfinite(np.asarray(M.slerp(np.zeros(16), a, t))).all()


def test_slerp_interpolates_whole_images_as_one_vector():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    row = np.asarray(M.slerp(a, b, np.array([0.0, 0.5, 1.0]), ndim=3))
    assert row.shape == (3, 6, 6, 3)
    np.testing.assert_allclose(row[1].ravel(), M.slerp(a.ravel(), b.ravel(), 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="last 3 axes agree"):
        M.slerp(a, b[:, :5], 0.5, ndim=3)


def test_interpolate_text_has_exact_ends_and_the_union_of_masks(pipe):
    a, b = pipe.encode_prompt(["a red circle"]), pipe.encode_prompt(["blue"])
    row = M.interpolate_text(a, b, jnp.array([0.0, 0.5, 1.0]))
    for field in ("embeds", "hidden_states", "mask"):
        np.testing.assert_array_equal(getattr(row, field)[0], getattr(a, field)[0])
        np.testing.assert_array_equal(getattr(row, field)[2], getattr(b, field)[0])
    np.testing.assert_array_equal(row.mask[1], a.mask[0] | b.mask[0])


# ----------------------------------------------------------------------------------- DDIM inversion


def test_ddim_timesteps_stop_at_max_timestep_and_are_karlos_at_999():
    t, prev = M.ddim_timesteps(5, 500)
    assert t.tolist() == [500, 375, 250, 125, 0] and prev.tolist() == [375, 250, 125, 0, -1]
    for n in (7, 25):
        np.testing.assert_array_equal(M.ddim_timesteps(n, 999), sch.step_pairs(n))


def test_ddim_inversion_then_eta_0_reconstructs_and_the_error_shrinks_with_steps(pipe, images, reconstruction):
    target = unit(pipe.decoder_pixels(images))
    decode = jax.jit(M.ddim_decode, static_argnums=0, static_argnames=("num_steps", "max_timestep"))
    outputs = {}
    for n in (4, 8):
        z = pipe.invert(images, num_inference_steps=n, max_timestep=500)
        outputs[n] = unit(decode(pipe.stages, pipe.params, z.image_embeddings, z.text, None, z.latents,
                                 jax.random.key(0), z.guidance_scale, 0.0, num_steps=n, max_timestep=500))
    outputs[16] = reconstruction.decoder_output  # the pipeline's: invert(**INVERT), then reconstruct
    errors = {n: (float(np.abs(x - target).mean()), float(np.abs(x - target).max())) for n, x in outputs.items()}
    print("mean / max |reconstruction - input| (pixels in [0, 1]) by DDIM steps:", errors)
    assert errors[4][0] > errors[8][0] > errors[16][0] and errors[4][1] > errors[8][1] > errors[16][1]
    assert errors[16][0] < 0.01 and errors[16][1] < 0.1   # the stated tolerance at 16 steps
    assert reconstruction.images.shape == (3, 2 * tiny_unclip.SIZE, 2 * tiny_unclip.SIZE, 3)


def test_with_an_exact_denoiser_the_default_schedule_reconstructs():
    """What a trained decoder approximates, a denoiser, made exact: the eps of a Gaussian mixture. With
    it the default schedule (up to t = 990) inverts and reconstructs, and the error shrinks as 1 / steps."""
    config = sch.DECODER
    state = sch.create_state(config)
    rng = np.random.default_rng(0)
    means, s = jnp.asarray(rng.uniform(-0.9, 0.9, (8, 192)), jnp.float32), 0.15

    def eps(x, t):
        a = sch.alpha_bar(state, t)
        var = a * s**2 + 1 - a
        centred = x[:, None] - jnp.sqrt(a) * means
        w = jax.nn.softmax(-jnp.sum(centred**2, -1) / (2 * var), -1)
        x0 = jnp.einsum("bk,bkd->bd", w, means + jnp.sqrt(a) * s**2 / var * centred)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    data = jnp.clip(means[:4] + s * jnp.asarray(rng.standard_normal((4, 192)), jnp.float32), -1, 1)

    @functools.partial(jax.jit, static_argnums=0)
    def roundtrip(n, x):
        x_t = M.ddim_invert_with(eps, state, config, x, n)
        return x_t, M.ddim_sample_with(eps, state, config, x_t, jax.random.key(0), 0.0, n)

    errors = {}
    for n in (10, 25, 50):
        x_t, back = roundtrip(n, data)
        errors[n] = float(jnp.abs(back - data).mean())
    print("exact denoiser, mean |reconstruction - input| (in [-1, 1]) by DDIM steps:", errors)
    assert errors[10] > errors[25] > errors[50] and errors[50] < 0.05
    assert 0.9 < float(jnp.std(x_t)) < 1.1  # x_T looks like the noise it stands for


def test_the_latent_is_noise_like_and_round_trips_through_npz(latent, tmp_path):
    x_t = np.asarray(latent.latents)
    assert latent.latents.shape == (3, tiny_unclip.SIZE, tiny_unclip.SIZE, 3) and np.isfinite(x_t).all()
    assert latent.image_embeddings.shape == (3, tiny_unclip.D)
    M.save_latent(tmp_path / "z.npz", latent)
    back = M.load_latent(tmp_path / "z.npz")
    assert (back.num_steps, back.max_timestep, back.guidance) == (16, 500, False)
    for a, b in zip(jax.tree_util.tree_leaves(latent), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_vary_ddim_eta_0_reconstructs_larger_eta_varies_more_and_sweeps_do_not_recompile(pipe, latent,
                                                                                          reconstruction):
    out = pipe.vary_ddim(latent[0], eta=[0.0, 0.5, 1.0], num_images_per_eta=1, rng=3, **ROW)
    compiled = mixin._decode._cache_size()
    change = [float(np.abs(out.decoder_output[i] - reconstruction.decoder_output[0]).mean()) for i in range(3)]
    assert change[0] < 1e-6 < 0.02 < change[1] < change[2]
    again = pipe.vary_ddim(latent[0], eta=[0.1, 0.2, 0.3], num_images_per_eta=1, rng=3, **ROW)
    assert mixin._decode._cache_size() == compiled
    assert not np.allclose(again.decoder_output, out.decoder_output)


# ---------------------------------------------------------------------- interpolations and text diffs


def test_text_diff_at_theta_0_is_the_reconstruction(pipe, latent, reconstruction):
    out = pipe.text_diff(latent[0], "a red circle", base="a photo", thetas=[0.0, 0.5, 1.0], rng=1, **ROW)
    np.testing.assert_allclose(out.images[0], reconstruction.images[0], atol=1e-5)
    np.testing.assert_allclose(out.decoder_output[0], reconstruction.decoder_output[0], atol=1e-5)
    assert np.abs(out.decoder_output[1] - out.decoder_output[0]).mean() > 0.01
    # The embeddings turn from z_i towards z_d, keeping |z_i|.
    z_i = np.asarray(latent.image_embeddings[0])
    np.testing.assert_array_equal(out.image_embeddings[0], z_i)
    np.testing.assert_allclose(np.linalg.norm(out.image_embeddings, axis=-1), np.linalg.norm(z_i), rtol=1e-5)
    np.testing.assert_allclose(angle(z_i, out.image_embeddings[1]), angle(z_i, out.image_embeddings[2]) / 2, rtol=1e-4)


def test_interpolation_with_fixed_latents_and_identical_ends_gives_identical_images(pipe, images):
    out = pipe.interpolate(images[0], images[0], num_images=3, latents="fixed", decoder_guidance_scale=1.0,
                           clip_sample=False, num_inference_steps=16, max_timestep=500, rng=2, **ROW)
    for i in (1, 2):
        np.testing.assert_allclose(out.images[i], out.images[0], atol=1e-6)
    np.testing.assert_allclose(out.thetas, [0, 0.5, 1])


def test_interpolation_between_inverted_latents_reconstructs_both_ends(pipe, latent, reconstruction):
    out = pipe.interpolate(latent[0], latent[1], num_images=3, latents="inverted", rng=1, **ROW)
    np.testing.assert_allclose(out.images[0], reconstruction.images[0], atol=1e-5)
    np.testing.assert_allclose(out.images[2], reconstruction.images[1], atol=1e-5)
    middle = out.decoder_output[1]
    assert np.abs(middle - reconstruction.decoder_output[0]).mean() > 0.01
    assert np.abs(middle - reconstruction.decoder_output[1]).mean() > 0.01


# ------------------------------------------------------------------------------------------ best of N


def test_best_of_n_returns_the_candidate_with_the_highest_dot_product(t2i):
    text = t2i.encode_prompt(["a red circle", "blue squares"])
    best, scores, candidates = mixin._best_of_n_prior(t2i.stages, t2i.params, text, t2i.encode_prompt([""]),
                                                      jax.random.key(0), jnp.float32(4.0), n=3, num_steps=3,
                                                      guidance=True)
    best, scores, candidates = np.asarray(best), np.asarray(scores), np.asarray(candidates)
    assert candidates.shape == (2, 3, tiny_unclip.D) and scores.shape == (2, 3)
    unit_text = np.asarray(text.embeds) / np.linalg.norm(text.embeds, axis=-1, keepdims=True)
    dots = np.einsum("bnd,bd->bn", candidates / np.linalg.norm(candidates, axis=-1, keepdims=True), unit_text)
    np.testing.assert_allclose(scores, dots, atol=1e-5)
    for p in range(2):
        assert np.abs(candidates[p, 0] - candidates[p, 1]).max() > 1e-3  # N different samples
        np.testing.assert_array_equal(best[p], candidates[p, np.argmax(dots[p])])


# ------------------------------------------------------------------------------------------- inpaint


def test_inpainting_keeps_the_unmasked_pixels_and_changes_the_masked_ones(pipe, images):
    mask = np.zeros((40, 40), bool)
    mask[8:28, 4:24] = True
    out = pipe.inpaint(images[0], mask, num_inference_steps=4, resample=2, decoder_guidance_scale=1.0, rng=0,
                       **ROW)
    small = unit(pipe.decoder_pixels(images[0]))[0]
    hole = np.asarray(mixin._mask_pixels(mask, tiny_unclip.SIZE))[..., 0] > 0
    assert 0.1 < hole.mean() < 0.5
    np.testing.assert_allclose(out.decoder_output[0][~hole], small[~hole], atol=1e-6)
    assert np.abs(out.decoder_output[0][hole] - small[hole]).mean() > 0.05
    # keep_known_pixels: the full-size output keeps them too.
    big = unit(M.decoder_pixels(images[0], 2 * tiny_unclip.SIZE))[0]
    big_hole = np.asarray(mixin._mask_pixels(mask, 2 * tiny_unclip.SIZE))[..., 0] > 0
    np.testing.assert_allclose(out.images[0][~big_hole], big[~big_hole], atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_gets_clear_errors(pipe, t2i, images, latent):
    image = images[0]
    with pytest.raises(ValueError, match=r"mask 0 has size 30x40; expected the image's size 40x40"):
        pipe.inpaint(image, np.zeros((40, 30), bool))
    with pytest.raises(ValueError, match="mask must be binary"):
        pipe.inpaint(image, np.full((40, 40), 0.5, np.float32))
    with pytest.raises(ValueError, match="mask must be binary"):
        pipe.inpaint(image, Image.fromarray(np.full((40, 40), 128, np.uint8)))
    with pytest.raises(ValueError, match=r"max_theta must be a number in \[0, 1\]"):
        pipe.text_diff(latent[0], "a red circle", max_theta=1.5)
    with pytest.raises(ValueError, match=r"theta must be in \[0, 1\]"):
        pipe.text_diff(latent[0], "a red circle", thetas=[0.0, -0.25])
    with pytest.raises(ValueError, match=r"theta must be in \[0, 1\]"):
        pipe.interpolate(image, image, thetas=[0.0, 1.2])
    with pytest.raises(ValueError, match="n .* must be an int >= 1"):
        t2i.sample_best_of_n("a red circle", n=0)
    with pytest.raises(ValueError, match="N >= 1"):
        M.best_of_n_prior(t2i.stages, t2i.params, t2i.encode_prompt(["x"]), None, jax.random.key(0), n=0,
                          guidance=False)
    with pytest.raises(ValueError, match=r"different sizes, \(40, 40\) and \(30, 40\)"):
        pipe.interpolate(image, smooth_image(5)[:, :30])
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        pipe.vary_ddim(latent[0], eta=-0.5)
    with pytest.raises(ValueError, match="num_steps must be an int in"):
        pipe.invert(image, num_inference_steps=600, max_timestep=500)


def test_missing_components_are_named_with_the_way_to_get_them(pipe, t2i, images):
    with pytest.raises(ValueError, match="inverting an image needs the image_encoder: load the pipeline with "
                                         "UnCLIPImageVariationPipeline.*or pass image_embeddings"):
        t2i.invert(images[0])
    with pytest.raises(ValueError, match="interpolation between images needs the image_encoder"):
        t2i.interpolate(images[0], images[1])
    with pytest.raises(ValueError, match="interpolation between prompts needs the prior: load the pipeline with "
                                         "UnCLIPPipeline"):
        pipe.interpolate("a red circle", "blue squares")
    with pytest.raises(ValueError, match="sampling from prompts needs the prior"):
        pipe.sample_best_of_n("a red circle")


def test_with_component_attaches_the_vision_tower(pipe, t2i, root, images, tmp_path):
    both = copy.copy(t2i).with_component("image_encoder", root / "variation")
    assert t2i.stages.image_encoder is None  # the original is untouched
    np.testing.assert_allclose(both.embed_images(images[0]), pipe.embed_images(images[0]), atol=1e-6)
    # One folder with every component (Karlo's two repositories merged) loads whole.
    shutil.copytree(root / "unclip", tmp_path / "all")
    shutil.copytree(root / "variation" / "image_encoder", tmp_path / "all" / "image_encoder")
    everything = unclip_jax.UnCLIPPipeline.from_pretrained_all(tmp_path / "all")
    assert everything.stages.prior is not None and everything.stages.image_encoder is not None
    np.testing.assert_allclose(everything.embed_images(images[0]), pipe.embed_images(images[0]), atol=1e-6)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_a_text_diff_row_as_a_png_strip(root, latent, tmp_path, capsys):
    import argparse
    from unclip_jax import manipulations_cli
    parser = argparse.ArgumentParser()
    manipulations_cli.add_subcommands(parser.add_subparsers(dest="command"))
    for command in manipulations_cli.SUBCOMMANDS:
        assert parser.parse_args([command, "--model", "m", "--image", "a.png"] + (
            ["--target", "x"] if command == "textdiff" else ["--mask", "m.png"] if command == "inpaint" else [])
        ).command == command
    M.save_latent(tmp_path / "latent.npz", latent[0])
    assert manipulations_cli.main(["textdiff", "--model", str(root / "variation"), "--latent",
                                   str(tmp_path / "latent.npz"), "--target", "a red circle", "--num-images", "3",
                                   "--max-theta", "1", "--seed", "1", "--super-res-steps", "2",
                                   "--out", str(tmp_path / "out")]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [f"textdiff_{i:03d}.png" for i in range(3)] + ["textdiff_grid.png"]
    strip = Image.open(tmp_path / "out" / "textdiff_grid.png")
    assert strip.size[0] > 3 * strip.size[1] - 10  # one row of three
    assert "wrote 3 image(s)" in capsys.readouterr().out
