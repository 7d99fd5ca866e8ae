"""Spherical interpolation of vectors (paper section 3.2: "we rotate between their CLIP embeddings
z_i1 and z_i2 using spherical interpolation").

A true slerp on the vectors, not the element-wise `acos` of a well-known community version: the
direction turns from a's to b's along their great circle at constant angular speed, so the angle
between slerp(a, b, t) and a is t times the angle between a and b; the norm goes linearly from |a| to
|b| (for the unit vectors of the paper it stays 1, and the textbook formula
sin((1 - t) W) / sin W a + sin(t W) / sin W b is the same thing; for vectors of unequal norms that
formula would bend the angle away from linear, which this does not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this sine of the angle the two directions count as (anti)parallel: the in-plane direction
# b - cos W a is then rounding noise and is replaced by a fixed perpendicular.
_PARALLEL = 1e-6
_TINY = 1e-30


def normalize(x, axis: int = -1) -> jax.Array:
    """x / |x| along `axis` (zero vectors stay zero)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), _TINY)


def slerp(a, b, t, *, ndim: int = 1) -> jax.Array:
    """Spherical interpolation from a (t = 0) to b (t = 1).

    a, b: (..., *V), where V, the last `ndim` axes, is one vector: ndim=1 for CLIP embeddings (..., D),
    ndim=3 for NHWC latents (..., H, W, C). t: a scalar or an array broadcasting against the leading
    axes, e.g. (N,) with a, b of shape (D,) gives the row (N, D).
    Returns float32 of shape broadcast(a.shape[:-ndim], b.shape[:-ndim], t.shape) + V.

    Exact at the ends (t = 0 returns a, t = 1 returns b, bit for bit) and wherever a == b; never NaN:
    parallel inputs give a, and antiparallel ones (every great circle is shortest) turn through one
    fixed perpendicular, the coordinate axis least aligned with a made orthogonal to it. t outside
    [0, 1] extrapolates along the same circle.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.ndim < ndim or b.ndim < ndim or a.shape[a.ndim - ndim:] != b.shape[b.ndim - ndim:]:
        raise ValueError(f"slerp needs two arrays whose last {ndim} axes agree (one vector each); got shapes "
                         f"{a.shape} and {b.shape}")
    vector = a.shape[a.ndim - ndim:]
    af = a.reshape(a.shape[:a.ndim - ndim] + (-1,))
    bf = b.reshape(b.shape[:b.ndim - ndim] + (-1,))
    t = jnp.asarray(t, jnp.float32)[..., None]

    norm_a = jnp.linalg.norm(af, axis=-1, keepdims=True)
    norm_b = jnp.linalg.norm(bf, axis=-1, keepdims=True)
    ua, ub = af / jnp.maximum(norm_a, _TINY), bf / jnp.maximum(norm_b, _TINY)
    cos = jnp.clip(jnp.sum(ua * ub, axis=-1, keepdims=True), -1.0, 1.0)
    in_plane = ub - cos * ua
    sin = jnp.linalg.norm(in_plane, axis=-1, keepdims=True)
    angle = jnp.arctan2(sin, cos)  # well conditioned near 0 and pi, unlike arccos

    # A fixed perpendicular for the (anti)parallel case: e_k - a_k a, k the axis least aligned with a.
    k = jnp.argmin(jnp.abs(ua), axis=-1)
    axis = jax.nn.one_hot(k, ua.shape[-1], dtype=jnp.float32)
    fallback = normalize(axis - jnp.take_along_axis(ua, k[..., None], axis=-1) * ua)
    perp = jnp.where(sin > _PARALLEL, in_plane / jnp.maximum(sin, _TINY), fallback)

    direction = jnp.cos(t * angle) * ua + jnp.sin(t * angle) * perp
    out = direction * ((1 - t) * norm_a + t * norm_b)
    same = jnp.all(af == bf, axis=-1, keepdims=True)
    out = jnp.where((t == 0) | same, af, jnp.where(t == 1, bf, out))
    return out.reshape(out.shape[:-1] + vector)
