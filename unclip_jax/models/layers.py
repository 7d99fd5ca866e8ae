"""Building blocks shared by every unclip_jax model.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), so a trainer can shard
any model through a short list of (logical axis -> mesh axis) rules without touching the model.
The logical names describe tensor dimensions:

    embed        model width (the residual stream, or a conv's input channels)
    mlp          an expanded width (attention projections, MLP hidden, conv output channels)
    vocab        token or position tables
    norm         scale and bias of a normalisation
    conv_height, conv_width   spatial kernel dimensions

Names of submodules mirror the PyTorch reference (`to_q`, `linear_1`, `down_blocks_0`...), which is
what lets `unclip_jax.convert` map checkpoints with a short table instead of per-key code.

Numerics: matmuls and convolutions run in the module's `dtype` (bf16 is fine); normalisation
statistics and attention softmax are always float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Which jax.nn.dot_product_attention implementation to use: None lets XLA choose (works on every
# backend); "cudnn" selects cuDNN flash attention on NVIDIA GPUs. Set with `set_attention_implementation`.
_ATTENTION_IMPLEMENTATION: str | None = None


def set_attention_implementation(implementation: str | None) -> None:
    """Selects the attention kernel for every model: None (XLA, any backend), "xla" or "cudnn"."""
    global _ATTENTION_IMPLEMENTATION
    if implementation not in (None, "xla", "cudnn"):
        raise ValueError(f"attention implementation must be None, 'xla' or 'cudnn', got {implementation!r}")
    _ATTENTION_IMPLEMENTATION = implementation


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention with float32 logits and softmax.

    q: (B, T, N, H); k, v: (B, S, N, H); bias broadcastable to (B, N, T, S) (additive, like the
    PyTorch reference's -10000 masks); mask: boolean, broadcastable to (B, N, T, S), True = attend.
    Returns (B, T, N, H) in q's dtype.
    """
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=_ATTENTION_IMPLEMENTATION)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


# PyTorch's default init for Linear and Conv (kaiming uniform with a=sqrt(5)), i.e. U(-1/sqrt(fan_in), ..):
# training from scratch then starts where the reference starts.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def Dense(features: int, *, axes: Sequence[str] = ("embed", "mlp"), use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None,
          kernel_init=torch_default_init) -> nn.Dense:
    """nn.Dense with logical axes (in, out) on the kernel and (out,) on the bias."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=_partitioned(kernel_init, axes),
                    bias_init=_partitioned(nn.initializers.zeros_init(), axes[-1:]))


def Conv(features: int, kernel_size: int, *, stride: int = 1, padding: int | str = "SAME",
         use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None, kernel_init=torch_default_init) -> nn.Conv:
    """NHWC 2-D convolution with PyTorch's explicit symmetric padding; kernel axes (h, w, in, out)."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=_partitioned(kernel_init, ("conv_height", "conv_width", "embed", "mlp")),
                   bias_init=_partitioned(nn.initializers.zeros_init(), ("mlp",)))


def GroupNorm(num_groups: int, epsilon: float = 1e-5, *, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm over the channel (last) axis; statistics in float32 whatever `dtype` is."""
    return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        name=name, force_float32_reductions=True,
                        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)))


def LayerNorm(epsilon: float = 1e-5, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis; statistics in float32 whatever `dtype` is."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                        force_float32_reductions=True,
                        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)))


def Embed(num_embeddings: int, features: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Embed:
    return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
                    embedding_init=_partitioned(nn.initializers.normal(0.02), ("vocab", "embed")))


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
          init=nn.initializers.zeros_init(), param_dtype: Dtype = jnp.float32) -> jax.Array:
    """A free parameter (learned embedding, positional table...) with logical axes."""
    return module.param(name, _partitioned(init, axes), tuple(shape), param_dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, downscale_freq_shift: float,
                       scale: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features (DDPM / "Attention is all you need"), (B,) -> (B, dim) float32.

    Frequencies exp(-log(max_period) * i / (dim/2 - downscale_freq_shift)); [sin, cos] or, with
    flip_sin_to_cos, [cos, sin] as the diffusers `Timesteps` layer orders them.
    """
    half = dim // 2
    exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = scale * timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def broadcast_timesteps(timestep, batch: int) -> jax.Array:
    """Accepts a Python number, a scalar or a (B,) array; returns (B,) (the diffusers convention)."""
    t = jnp.asarray(timestep)
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"timestep has shape {t.shape}; expected a scalar or ({batch},) = (batch,)")
    return t


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2, the MLP that turns sinusoidal features into the time embedding."""
    time_embed_dim: int
    out_dim: int | None = None
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.time_embed_dim, name="linear_1", **kw)(x)
        x = activation(self.act_fn)(x)
        return Dense(self.out_dim or self.time_embed_dim, axes=("mlp", "embed"), name="linear_2", **kw)(x)


def check_shape(name: str, x, expected: Sequence[int | None], meaning: str) -> None:
    """Raises a ValueError that names the argument and the expected shape (None = any size)."""
    shape = tuple(np.shape(x))
    ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
    if not ok:
        exp = "(" + ", ".join("?" if e is None else str(e) for e in expected) + (",)" if len(expected) == 1 else ")")
        raise ValueError(f"{name} has shape {shape}; expected {exp} = {meaning}")
