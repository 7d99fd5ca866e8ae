"""The upsamplers' training inputs: random crops and corrupted low-resolution conditioning (paper section 2,
"Decoder": gaussian blur for 64 -> 256, BSR-style degradation for 256 -> 1024; Zhang et al. 2021).

    crop = random_crop(rng, image, 64)                                   # host, (C, C, 3)
    low = degrade_np(rng, crops, kind="blur", factor=4)                  # host, (B, C/4, C/4, 3)
    low = degrade_jax(key, crops, kind="bsr", factor=4)                  # device, same maths, jittable

Images are NHWC float32 in [-1, 1]. Every operation is a fixed linear map per axis (resize and blur are
(out, in) matrices, JPEG is an 8x8 DCT), written once over an array module `xp` (numpy or jax.numpy): the host
and the device versions are the same code, and given the same parameters they agree to float rounding
(`sample_params_*` draws the parameters; `apply` applies them).

BSR here is a fixed-order version of Zhang et al.'s shuffled pipeline, so it compiles to one static graph:
axis-aligned (an)isotropic gaussian blur of the high-resolution crop -> downsample by `factor` with a random
kernel (area, bilinear, bicubic; all antialiased) -> gaussian noise (colour or grey) -> JPEG-like compression
(8x8 DCT quantised with the libjpeg tables at a random quality, no chroma subsampling; applied when the
low-resolution size is a multiple of 8).

On the host, run with OPENBLAS_NUM_THREADS=1: the pipeline's worker threads are the parallelism, and OpenBLAS's
own threads fighting them made BSR 8x slower in benchmarks/DATA.md.
"""

from __future__ import annotations

import functools
import math

import numpy as np

KINDS = ("blur", "bsr", "none")
RESIZE_METHODS = ("area", "linear", "cubic")

# Paper / Karlo: blur for the first upsampler (sigma as in GLIDE-style conditioning corruption); BSRGAN's ranges.
BLUR_SIGMA = (0.4, 0.6)          # on the low-resolution image, pixels
BSR_BLUR_SIGMA = (0.1, 2.8)      # on the high-resolution crop, pixels (BSRGAN, scale factor 4)
BSR_NOISE = (1 / 255, 25 / 255)  # std on [0, 1] images (BSRGAN)
BSR_GREY_NOISE_P = 0.4
BSR_JPEG_QUALITY = (30, 95)
BSR_JPEG_P = 0.9


# ------------------------------------------------------------------------------------------------ crops

def random_crop_box(rng: np.random.Generator, height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner (y, x) of a uniformly random size x size crop of a height x width image."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} is larger than the image ({height} x {width})")
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def random_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> a uniformly random (size, size, C) crop."""
    y, x = random_crop_box(rng, image.shape[0], image.shape[1], size)
    return image[y:y + size, x:x + size]


# ------------------------------------------------------------------------------------------------ linear maps

def _keys_cubic(x):
    out = ((1.5 * x - 2.5) * x) * x + 1.0
    out = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, out)
    return np.where(x >= 2.0, 0.0, out)


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, method: str = "cubic") -> np.ndarray:
    """(out_size, in_size) float32 weights of an antialiased 1-D resize, the ones `jax.image.resize` uses.

    cubic: Keys a = -0.5 (Pillow's and torch's antialiased bicubic); linear: triangle; area: box averaging.
    """
    scale = out_size / in_size
    inv = 1.0 / scale
    if method == "area":
        left = np.arange(out_size) * inv
        w = np.maximum(0.0, np.minimum(left[:, None] + inv, np.arange(in_size)[None] + 1.0)
                       - np.maximum(left[:, None], np.arange(in_size)[None]))
    else:
        kernel = {"cubic": _keys_cubic, "linear": lambda x: np.maximum(0.0, 1.0 - x)}.get(method)
        if kernel is None:
            raise ValueError(f"method={method!r}; expected one of {RESIZE_METHODS}")
        sample = (np.arange(out_size) + 0.5) * inv - 0.5
        x = np.abs(sample[:, None] - np.arange(in_size)[None]) / max(inv, 1.0)
        w = kernel(x)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, w / np.where(total != 0, total, 1), 0.0)
    return w.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _reflect_taps(size: int, radius: int) -> np.ndarray:
    """(2 radius + 1, size, size) 0/1: tap t of output i reads input reflect(i + t - radius) (mirror, no repeat)."""
    taps = np.zeros((2 * radius + 1, size, size), np.float32)
    for t in range(2 * radius + 1):
        for i in range(size):
            j = i + t - radius
            period = 2 * (size - 1) if size > 1 else 1
            j = j % period if size > 1 else 0
            j = period - j if j >= size else j
            taps[t, i, j] += 1.0
    return taps


def _blur_matrices(xp, sigma, size: int, radius: int):
    """sigma (B,) -> (B, size, size) gaussian blur matrices with reflected borders."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    s = xp.maximum(sigma, 1e-3)[:, None]
    w = xp.exp(-0.5 * (offsets[None] / s) ** 2)
    w = w / xp.sum(w, axis=1, keepdims=True)
    taps = _reflect_taps(size, radius)
    return xp.matmul(w, taps.reshape(len(taps), size * size)).reshape(-1, size, size)


# Matrix products along one image axis, written as matmuls (BLAS on the host; numpy's einsum would loop).

def _along_h(xp, m, x):
    """m (out, H) or per-image (B, out, H) applied along axis 1 of x (B, H, W, C)."""
    b, h, w, c = x.shape
    return xp.matmul(m, x.reshape(b, h, w * c)).reshape(b, m.shape[-2], w, c)


def _along_w(xp, m, x):
    """m (out, W) or per-image (B, out, W) applied along axis 2 of x (B, H, W, C)."""
    return xp.transpose(_along_h(xp, m, xp.transpose(x, (0, 2, 1, 3))), (0, 2, 1, 3))


def gaussian_blur(xp, images, sigma_y, sigma_x, *, max_sigma: float):
    """(B, H, W, C), per-image sigmas (B,) -> blurred (B, H, W, C); kernel radius ceil(3 max_sigma)."""
    radius = max(1, math.ceil(3 * max_sigma))
    _, h, w, _ = images.shape
    out = _along_h(xp, _blur_matrices(xp, sigma_y, h, radius), images)
    return _along_w(xp, _blur_matrices(xp, sigma_x, w, radius), out)


def resize(xp, images, size: int, method: str = "cubic"):
    """(B, H, W, C) -> (B, size, size, C), antialiased (jax.image.resize(..., method, antialias=True))."""
    _, h, w, _ = images.shape
    return _along_w(xp, resize_matrix(w, size, method), _along_h(xp, resize_matrix(h, size, method), images))


# ------------------------------------------------------------------------------------------------ JPEG

_LUMA_Q = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32).reshape(8, 8)
_CHROMA_Q = np.full((8, 8), 99, np.float32)
_CHROMA_Q[:4, :4] = np.array([17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99]).reshape(4, 4)
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                       np.float32)
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC).astype(np.float32)


def _dct_matrix() -> np.ndarray:
    k, n = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    d = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)  # orthonormal DCT-II: coefficients = D @ block @ D.T


_DCT = _dct_matrix()


def jpeg_tables(xp, quality):
    """quality (B,) in [1, 100] -> (B, 3, 8, 8) quantisation steps (Y, Cb, Cr), libjpeg's quality scaling."""
    q = xp.clip(quality, 1, 100)
    scale = xp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)[:, None, None]
    tables = [xp.clip(xp.floor((t[None] * scale + 50.0) / 100.0), 1.0, 255.0) for t in (_LUMA_Q, _CHROMA_Q, _CHROMA_Q)]
    return xp.stack(tables, axis=1)


def jpeg_compress(xp, images, quality):
    """(B, H, W, 3) in [-1, 1], H and W multiples of 8 -> the image after JPEG-like quantisation at `quality` (B,)."""
    b, h, w, _ = images.shape
    if h % 8 or w % 8:
        raise ValueError(f"JPEG degradation needs sizes that are multiples of 8; got {h} x {w}")
    ycc = xp.matmul((images + 1.0) * 127.5, _RGB_TO_YCC.T) - np.array([128.0, 0.0, 0.0], np.float32)
    blocks = xp.transpose(ycc.reshape(b, h // 8, 8, w // 8, 8, 3), (0, 1, 3, 5, 2, 4))  # (B, p, q, C, 8, 8)
    coef = xp.matmul(xp.matmul(_DCT, blocks), _DCT.T)
    steps = jpeg_tables(xp, quality)[:, None, None]  # (B, 1, 1, 3, 8, 8)
    coef = xp.round(coef / steps) * steps
    blocks = xp.matmul(xp.matmul(_DCT.T, coef), _DCT)
    ycc = xp.transpose(blocks, (0, 1, 4, 2, 5, 3)).reshape(b, h, w, 3) + np.array([128.0, 0.0, 0.0], np.float32)
    rgb = xp.clip(xp.round(xp.matmul(ycc, _YCC_TO_RGB.T)), 0.0, 255.0)
    return xp.clip(rgb / 127.5 - 1.0, -1.0, 1.0)  # 255 / 127.5 - 1 rounds above 1 in float32


# ------------------------------------------------------------------------------------------------ degradations

def _check(images, factor: int, kind: str):
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected (batch, size, size, 3), NHWC in [-1, 1]")
    h, w = images.shape[1:3]
    if h % factor or w % factor:
        raise ValueError(f"images of {h} x {w} cannot be reduced by factor={factor}: crop sizes must be "
                         "multiples of it")


def _lerp(u, bounds):
    return bounds[0] + u * (bounds[1] - bounds[0])


def params_from_uniform(xp, u, noise, *, kind: str) -> dict:
    """Degradation parameters from uniforms u (B, 8) in [0, 1) and standard normals noise (B, h, w, 3).

    Both samplers below draw these two arrays and share this mapping, so host and device draw from the same
    distributions (and one random draw per array keeps the device version quick to compile).
    """
    if kind == "blur":
        return {"sigma": _lerp(u[:, 0], BLUR_SIGMA).astype(np.float32)}
    if kind == "none":
        return {}
    sy = _lerp(u[:, 0], BSR_BLUR_SIGMA)
    sx = xp.where(u[:, 1] < 0.5, sy, _lerp(u[:, 2], BSR_BLUR_SIGMA))  # isotropic half of the time
    grey = u[:, 3] < BSR_GREY_NOISE_P
    noise = xp.where(grey[:, None, None, None], noise[..., :1], noise)
    quality = xp.floor(_lerp(u[:, 7], (BSR_JPEG_QUALITY[0], BSR_JPEG_QUALITY[1] + 1)))
    return {"sigma_y": sy.astype(np.float32), "sigma_x": sx.astype(np.float32),
            "method": xp.minimum(xp.floor(u[:, 4] * len(RESIZE_METHODS)), len(RESIZE_METHODS) - 1).astype(np.int32),
            "noise_std": (2 * _lerp(u[:, 5], BSR_NOISE)).astype(np.float32), "noise": noise.astype(np.float32),
            "jpeg": u[:, 6] < BSR_JPEG_P, "quality": quality.astype(np.float32)}


def sample_params_np(rng: np.random.Generator, batch: int, *, kind: str, low_size: int) -> dict[str, np.ndarray]:
    """Random degradation parameters for `batch` images, drawn on the host (numpy)."""
    u = rng.random((batch, 8), dtype=np.float32)
    noise = rng.standard_normal((batch, low_size, low_size, 3), dtype=np.float32) if kind == "bsr" else None
    return params_from_uniform(np, u, noise, kind=kind)


def sample_params_jax(key, batch: int, *, kind: str, low_size: int) -> dict:
    """The same distributions as `sample_params_np`, drawn on the device from a jax key (jittable)."""
    import jax
    import jax.numpy as jnp
    k_u, k_noise = jax.random.split(key)
    u = jax.random.uniform(k_u, (batch, 8))
    noise = None
    if kind == "bsr":
        # Drawn flat and reshaped: XLA:CPU takes seconds to compile threefry over a rank-4 shape, and
        # jax.random.normal too; Box-Muller over flat uniforms compiles in well under one.
        shape = (batch, low_size, low_size, 3)
        a, b = jax.random.uniform(k_noise, (2, int(np.prod(shape))), minval=1e-7, maxval=1.0)
        noise = (jnp.sqrt(-2.0 * jnp.log(a)) * jnp.cos(2.0 * np.pi * b)).reshape(shape)
    return params_from_uniform(jnp, u, noise, kind=kind)


def apply(xp, images, params: dict, *, kind: str, factor: int):
    """High-resolution crops (B, C, C, 3) in [-1, 1] + parameters -> low-resolution conditioning (B, C/f, C/f, 3).

    xp: numpy or jax.numpy. blur: bicubic downsample, then gaussian blur; bsr: see the module docstring;
    none: bicubic downsample only.
    """
    _check(images, factor, kind)
    low_size = images.shape[1] // factor
    if kind == "none":
        return resize(xp, images, low_size, "cubic")
    if kind == "blur":
        low = resize(xp, images, low_size, "cubic")
        return xp.clip(gaussian_blur(xp, low, params["sigma"], params["sigma"], max_sigma=BLUR_SIGMA[1]), -1.0, 1.0)
    x = gaussian_blur(xp, images, params["sigma_y"], params["sigma_x"], max_sigma=BSR_BLUR_SIGMA[1])
    choice = params["method"]
    low = sum(xp.where((choice == i)[:, None, None, None], resize(xp, x, low_size, m), 0.0)
              for i, m in enumerate(RESIZE_METHODS))
    low = xp.clip(low + params["noise_std"][:, None, None, None] * params["noise"], -1.0, 1.0)
    if low_size % 8 == 0:
        low = xp.where(params["jpeg"][:, None, None, None], jpeg_compress(xp, low, params["quality"]), low)
    return low.astype(np.float32)


def degrade_np(rng: np.random.Generator, images: np.ndarray, *, kind: str = "blur", factor: int = 4) -> np.ndarray:
    """Host version: (B, C, C, 3) float32 in [-1, 1] -> degraded (B, C/f, C/f, 3) float32."""
    images = np.asarray(images, np.float32)
    _check(images, factor, kind)
    params = sample_params_np(rng, images.shape[0], kind=kind, low_size=images.shape[1] // factor)
    return np.asarray(apply(np, images, params, kind=kind, factor=factor), np.float32)


def degrade_jax(key, images, *, kind: str = "blur", factor: int = 4):
    """Device version, for the train step (jit it, or call it inside a jitted step; kind and factor static):
    (B, C, C, 3) in [-1, 1] -> degraded (B, C/f, C/f, 3) float32. Batch-sharded inputs stay sharded: every
    operation is per image."""
    import jax.numpy as jnp
    images = jnp.asarray(images, jnp.float32)
    _check(images, factor, kind)
    params = sample_params_jax(key, images.shape[0], kind=kind, low_size=images.shape[1] // factor)
    return apply(jnp, images, params, kind=kind, factor=factor)

