"""The blocks of unclip_jax's UNet (NHWC), one Flax module per diffusers block type.

    ResnetBlock   diffusers ResnetBlock2D (with up=True / down=True it also resamples, as the
                  unCLIP UNets do instead of separate up/down-sampling convolutions)
    Attention     diffusers Attention with AttnAddedKVProcessor ("added KV", the decoder's
                  attention) or AttnProcessor (plain self-attention, UNet2DModel's mid block)
    DownBlock     ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D
    UpBlock       ResnetUpsampleBlock2D / SimpleCrossAttnUpBlock2D
    MidBlock      UNetMidBlock2DSimpleCrossAttn / UNetMidBlock2D

Submodule names are the diffusers attribute names (`resnets_0`, `attentions_0`, `to_out_0`, ...), which is
what lets `unclip_jax.convert` map checkpoints generically. Hyper-parameters shared by every block of
a UNet travel in two small frozen dataclasses, `ResnetSpec` and `AttentionSpec`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ResnetSpec:
    """What every ResnetBlock2D of a UNet shares (diffusers: resnet_groups, resnet_eps, ...)."""
    groups: int
    eps: float
    act_fn: str
    time_embedding_norm: str = "default"   # "default": h + temb; "scale_shift": norm(h) * (1 + scale) + shift
    skip_time_act: bool = False            # True: no activation on temb before time_emb_proj
    output_scale_factor: float = 1.0
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention layer's shape and kind.

    added_kv: keys and values = [add_k/v_proj(context); to_k/v(spatial tokens)] (AttnAddedKVProcessor);
    otherwise plain self-attention over the spatial tokens (AttnProcessor).
    """
    heads: int
    dim_head: int
    norm_groups: int | None            # GroupNorm on the spatial tokens (None: no norm)
    norm_eps: float = 1e-5
    added_kv: bool = False
    only_cross_attention: bool = False  # added_kv only: no to_k/to_v, keys = context tokens alone
    cross_attention_norm: str | None = None   # None or "group_norm" (32 groups over the context)
    rescale_output_factor: float = 1.0


def _upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), nearest neighbour (torch interpolate(scale_factor=2, mode='nearest'))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample_avg(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, C), 2x2 average pooling (torch AvgPool2d(2, 2))."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D: GroupNorm-act-(resample)-conv, + time embedding, GroupNorm-act-dropout-conv, + skip.

    x: (B, H, W, C_in), temb: (B, time_embed_dim) -> (B, H', W', out_channels) with H' = 2H (up), H/2 (down) or H.
    """
    out_channels: int
    spec: ResnetSpec
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, deterministic: bool = True) -> jax.Array:
        spec, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = layers.activation(spec.act_fn)
        h = act(layers.GroupNorm(spec.groups, spec.eps, name="norm1", **kw)(x))
        if self.up:
            x, h = _upsample_nearest(x), _upsample_nearest(h)
        elif self.down:
            x, h = _downsample_avg(x), _downsample_avg(h)
        h = layers.Conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)

        scale_shift = spec.time_embedding_norm == "scale_shift"
        t = temb if spec.skip_time_act else act(temb)
        t = layers.Dense(self.out_channels * (2 if scale_shift else 1), name="time_emb_proj", **kw)(t)
        t = t[:, None, None, :]
        norm2 = layers.GroupNorm(spec.groups, spec.eps, name="norm2", **kw)
        if scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        h = nn.Dropout(spec.dropout)(act(h), deterministic=deterministic)
        h = layers.Conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)

        if x.shape[-1] != self.out_channels:
            x = layers.Conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        out = x.astype(h.dtype) + h
        if spec.output_scale_factor != 1.0:
            out = out / spec.output_scale_factor
        return out


class Attention(nn.Module):
    """Attention over a feature map, with a residual connection (diffusers Attention on 4-D input).

    x: (B, H, W, C); context: (B, S, D) context tokens (added_kv only); bias: additive, (B, 1, 1, S)
    over the context tokens (0 = keep, -10000 = hide). Returns (B, H, W, C).

    Added KV (the unCLIP decoder, GLIDE-style): the spatial tokens are group-normed, queries come from
    them, and keys/values are the projected context tokens followed by the spatial tokens themselves,
    so one softmax covers [context; spatial]. The context bias is padded with zeros for the spatial keys.
    """
    spec: AttentionSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
        spec, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = x.shape
        inner = spec.heads * spec.dim_head
        h = x.reshape(b, height * width, channels)
        if spec.norm_groups is not None:
            h = layers.GroupNorm(spec.norm_groups, spec.norm_eps, name="group_norm", **kw)(h)
        q = layers.Dense(inner, name="to_q", **kw)(h)

        if spec.added_kv:
            if spec.cross_attention_norm == "group_norm":
                context = layers.GroupNorm(32, 1e-5, name="norm_cross", **kw)(context)
            k = layers.Dense(inner, name="add_k_proj", **kw)(context)
            v = layers.Dense(inner, name="add_v_proj", **kw)(context)
            if not spec.only_cross_attention:
                k = jnp.concatenate([k, layers.Dense(inner, name="to_k", **kw)(h)], axis=1)
                v = jnp.concatenate([v, layers.Dense(inner, name="to_v", **kw)(h)], axis=1)
                if bias is not None:  # the spatial keys are never masked
                    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, height * width)))
        else:
            k = layers.Dense(inner, name="to_k", **kw)(h)
            v = layers.Dense(inner, name="to_v", **kw)(h)
            bias = None

        split = lambda t: t.reshape(b, t.shape[1], spec.heads, spec.dim_head)
        out = layers.attention(split(q), split(k), split(v), bias=bias)
        out = layers.Dense(channels, axes=("mlp", "embed"), name="to_out_0", **kw)(out.reshape(b, -1, inner))
        out = out.reshape(b, height, width, channels) + x.astype(out.dtype)
        if spec.rescale_output_factor != 1.0:
            out = out / spec.rescale_output_factor
        return out


def _resnet_cls(remat: bool):
    # static_argnums counts `self` as 0: (self, x, temb, deterministic).
    return nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock


def _attention_cls(remat: bool):
    return nn.remat(Attention) if remat else Attention


class DownBlock(nn.Module):
    """ResnetDownsampleBlock2D (attention=None) or SimpleCrossAttnDownBlock2D.

    num_layers x (resnet [-> attention]), then a resnet with down=True (`downsamplers_0`) unless last.
    Returns (h, skips): every layer's output and the downsampler's, for the up path.
    """
    num_layers: int
    out_channels: int
    add_downsample: bool
    resnet: ResnetSpec
    attention: AttentionSpec | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context=None, bias=None, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, attn = _resnet_cls(self.remat), _attention_cls(self.remat)
        skips = []
        for j in range(self.num_layers):
            h = resnet(self.out_channels, self.resnet, name=f"resnets_{j}", **kw)(h, temb, deterministic)
            if self.attention is not None:
                h = attn(self.attention, name=f"attentions_{j}", **kw)(h, context, bias)
            skips.append(h)
        if self.add_downsample:
            h = resnet(self.out_channels, self.resnet, down=True, name="downsamplers_0", **kw)(h, temb, deterministic)
            skips.append(h)
        return h, tuple(skips)


class UpBlock(nn.Module):
    """ResnetUpsampleBlock2D (attention=None) or SimpleCrossAttnUpBlock2D.

    Layer j concatenates (on channels, after h) the skip popped from the END of `skips`, so skips are
    consumed in the reverse of the order the down path produced them. A resnet with up=True
    (`upsamplers_0`) follows unless this is the last block.
    """
    num_layers: int
    out_channels: int
    add_upsample: bool
    resnet: ResnetSpec
    attention: AttentionSpec | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, skips: Sequence[jax.Array], temb, context=None, bias=None, deterministic=True):
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock with {self.num_layers} layers got {len(skips)} skip connections")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, attn = _resnet_cls(self.remat), _attention_cls(self.remat)
        for j in range(self.num_layers):
            skip = skips[-1 - j]
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
            h = resnet(self.out_channels, self.resnet, name=f"resnets_{j}", **kw)(h, temb, deterministic)
            if self.attention is not None:
                h = attn(self.attention, name=f"attentions_{j}", **kw)(h, context, bias)
        if self.add_upsample:
            h = resnet(self.out_channels, self.resnet, up=True, name="upsamplers_0", **kw)(h, temb, deterministic)
        return h


class MidBlock(nn.Module):
    """resnets_0, then num_layers x (attentions_i (if attention) -> resnets_{i+1}).

    UNetMidBlock2DSimpleCrossAttn: num_layers 1, added-KV attention. UNetMidBlock2D: in a
    UNet2DConditionModel num_layers 0 (one resnet); in a UNet2DModel num_layers 1, with self-attention
    when add_attention.
    """
    channels: int
    num_layers: int
    resnet: ResnetSpec
    attention: AttentionSpec | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context=None, bias=None, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, attn = _resnet_cls(self.remat), _attention_cls(self.remat)
        h = resnet(self.channels, self.resnet, name="resnets_0", **kw)(h, temb, deterministic)
        for i in range(self.num_layers):
            if self.attention is not None:
                h = attn(self.attention, name=f"attentions_{i}", **kw)(h, context, bias)
            h = resnet(self.channels, self.resnet, name=f"resnets_{i + 1}", **kw)(h, temb, deterministic)
        return h
