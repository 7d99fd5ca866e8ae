"""The upsamplers' crops and conditioning corruption: host (numpy) and device (jax) versions are the same maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.data import degrade


def _images(batch=2, size=64, seed=0):
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(-1, 1, (batch, size // 8, size // 8, 3)).astype(np.float32)
    return np.clip(np.asarray(jax.image.resize(smooth, (batch, size, size, 3), "cubic")) +
                   0.1 * rng.standard_normal((batch, size, size, 3)).astype(np.float32), -1, 1)


@pytest.mark.parametrize("method", ["cubic", "linear"])
@pytest.mark.parametrize("out_size", [16, 48, 128])
def test_resize_matrix_matches_jax_image_resize_with_antialias(method, out_size):
    x = _images()
    ours = degrade.resize(np, x, out_size, method)
    ref = np.asarray(jax.image.resize(x, (2, out_size, out_size, 3), method, antialias=True))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_area_resize_averages_blocks():
    x = _images()
    np.testing.assert_allclose(degrade.resize(np, x, 16, "area"), x.reshape(2, 16, 4, 16, 4, 3).mean((2, 4)),
                               atol=1e-6)


@pytest.mark.parametrize("kind,size", [("blur", 64), ("bsr", 64), ("bsr", 256), ("none", 64)])
def test_host_and_device_degradations_agree_given_the_same_parameters(kind, size):
    x = _images(size=size)
    params = degrade.sample_params_np(np.random.default_rng(1), 2, kind=kind, low_size=size // 4)
    host = degrade.apply(np, x, params, kind=kind, factor=4)
    device = jax.jit(lambda x, p: degrade.apply(jnp, x, p, kind=kind, factor=4))(x, params)
    assert host.shape == device.shape == (2, size // 4, size // 4, 3)
    diff = np.abs(host - np.asarray(device))
    # JPEG rounds coefficients and pixels: a float32 ulp can flip one rounding, so allow rare pixel-level flips.
    assert diff.mean() < 1e-4 and (diff > 1e-3).mean() < 1e-3, (diff.mean(), diff.max())


def test_device_degradation_is_jittable_and_depends_on_the_key():
    x = jnp.asarray(_images(size=64))
    f = jax.jit(degrade.degrade_jax, static_argnames=("kind", "factor"))
    a = f(jax.random.key(0), x, kind="bsr", factor=4)
    b = f(jax.random.key(1), x, kind="bsr", factor=4)
    assert a.shape == (2, 16, 16, 3) and a.dtype == jnp.float32
    assert float(jnp.abs(a).max()) <= 1.0 and not np.allclose(a, b)


def test_blur_keeps_constant_images_constant_and_smooths_noise():
    const = np.full((1, 32, 32, 3), 0.3, np.float32)
    out = degrade.gaussian_blur(np, const, np.array([2.0], np.float32), np.array([0.5], np.float32), max_sigma=2.8)
    np.testing.assert_allclose(out, const, atol=1e-6)
    noise = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    blurred = degrade.gaussian_blur(np, noise, np.array([1.5], np.float32), np.array([1.5], np.float32), max_sigma=2.8)
    assert blurred.std() < 0.5 * noise.std()


def test_jpeg_error_grows_as_quality_drops():
    x = _images(size=64)
    errors = [np.abs(degrade.jpeg_compress(np, x, np.full(2, q, np.float32)) - x).mean() for q in (95, 60, 20)]
    assert errors[0] < errors[1] < errors[2] and errors[0] < 0.05


def test_random_crop_stays_inside_and_covers_every_offset():
    rng = np.random.default_rng(0)
    boxes = {degrade.random_crop_box(rng, 10, 12, 8) for _ in range(500)}
    assert boxes == {(y, x) for y in range(3) for x in range(5)}
    image = np.arange(10 * 12 * 3, dtype=np.float32).reshape(10, 12, 3)
    assert degrade.random_crop(rng, image, 8).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="larger than the image"):
        degrade.random_crop(rng, image, 11)


def test_sizes_that_do_not_divide_by_the_factor_are_refused():
    with pytest.raises(ValueError, match="multiples of it"):
        degrade.degrade_np(np.random.default_rng(0), np.zeros((1, 30, 30, 3), np.float32), factor=4)
