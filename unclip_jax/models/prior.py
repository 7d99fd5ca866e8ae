"""The diffusion prior (paper section 2.2): a decoder-only transformer that predicts a CLIP image
embedding from text, in Karlo's (diffusers `PriorTransformer`) form.

Token sequence (paper: "the encoded text, the CLIP text embedding, an embedding for the diffusion
timestep, the noised CLIP image embedding, and a final embedding whose output ... is used to predict
the unnoised CLIP image embedding"):

    [proj(text hidden states) (77), proj(text embedding), time embedding, proj_in(noisy x), prd token]

plus a learned positional table, under a causal mask and the text padding mask. The output is read
at the last (prd) token. The prior works on embeddings normalised by the learned `clip_mean` and
`clip_std`; `unnormalize` maps its samples back to CLIP space.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models import layers
from unclip_jax.models.layers import Dense, LayerNorm, check_shape

Dtype = Any


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """diffusers `PriorTransformer` options; Karlo: 32 heads x 64, 20 layers, embedding_dim 768."""
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    _CHOICES = {"norm_in_type": (None, "layer"), "embedding_proj_norm_type": (None, "layer"),
                "encoder_hid_proj_type": (None, "linear"), "added_emb_type": (None, "prd")}

    @classmethod
    def from_dict(cls, d: dict) -> "PriorConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            if k.startswith("_"):
                continue
            if k not in fields:
                raise ValueError(f"unclip_jax's PriorTransformer does not support the config option {k!r} (= {v!r})")
            if k in cls._CHOICES and v not in cls._CHOICES[k]:
                raise ValueError(f"unclip_jax's PriorTransformer does not support {k}={v!r}; "
                                 f"supported: {cls._CHOICES[k]}")
            kw[k] = v
        config = cls(**kw)
        layers.activation(config.time_embed_act_fn)  # fails early, naming it, if unsupported
        return config

    def to_dict(self) -> dict:
        return {"_class_name": "PriorTransformer", **dataclasses.asdict(self)}

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class TransformerBlock(nn.Module):
    """Pre-LN self-attention + GELU MLP (diffusers BasicTransformerBlock with attention bias)."""
    heads: int
    head_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = self.heads * self.head_dim
        h = LayerNorm(name="norm1", **kw)(x)
        h = _SelfAttention(self.heads, self.head_dim, name="attn1", **kw)(h, bias)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)

        h = LayerNorm(name="norm3", **kw)(x)
        h = _FeedForward(dim, self.dropout, name="ff", **kw)(h, deterministic)
        return x + h


class _SelfAttention(nn.Module):
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, s, _ = x.shape
        dim = self.heads * self.head_dim
        split = lambda t: t.reshape(b, s, self.heads, self.head_dim)
        q = split(Dense(dim, name="to_q", **kw)(x))
        k = split(Dense(dim, name="to_k", **kw)(x))
        v = split(Dense(dim, name="to_v", **kw)(x))
        out = layers.attention(q, k, v, bias=bias).reshape(b, s, dim)
        return Dense(x.shape[-1], axes=("mlp", "embed"), name="to_out_0", **kw)(out)


class _GELU(nn.Module):
    """diffusers' GELU activation module: a Linear named `proj`, then exact GELU."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.gelu(Dense(self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x),
                       approximate=False)


class _FeedForward(nn.Module):
    dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _GELU(4 * self.dim, name="net_0", **kw)(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return Dense(self.dim, axes=("mlp", "embed"), name="net_2", **kw)(h)


class PriorTransformer(nn.Module):
    """Predicts the (normalised) CLIP image embedding x0 from a noisy one and the text.

    __call__(hidden_states (B, D), timestep (scalar or (B,)), proj_embedding (B, Dp),
             encoder_hidden_states (B, N, D), attention_mask (B, N) bool) -> (B, clip_embed_dim)

    D = embedding_dim, N = num_embeddings (77 for Karlo). The causal mask is always applied (the
    prior was trained causal); the diffusers forward omits it when no attention_mask is given, which
    its pipelines never do.
    """
    config: PriorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    CONFIG_CLASS = PriorConfig
    REFERENCE_CLASSES = ("PriorTransformer",)
    CHECKPOINT_RULES = ()
    IGNORED_CHECKPOINT_KEYS = (r"causal_attention_mask",)

    def dummy_inputs(self, batch_size: int = 1) -> dict:
        c = self.config
        inputs = dict(hidden_states=jnp.zeros((batch_size, c.embedding_dim)), timestep=jnp.zeros((batch_size,), jnp.int32),
                      proj_embedding=jnp.zeros((batch_size, c.embedding_proj_dim or c.embedding_dim)))
        if c.encoder_hid_proj_type is not None:
            inputs["encoder_hidden_states"] = jnp.zeros((batch_size, c.num_embeddings, c.embedding_dim))
            inputs["attention_mask"] = jnp.ones((batch_size, c.num_embeddings), bool)
        return inputs

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = c.inner_dim
        clip_dim = c.clip_embed_dim or c.embedding_dim
        self.time_embedding = layers.TimestepEmbedding(c.time_embed_dim or dim, out_dim=dim, act_fn=c.time_embed_act_fn,
                                                       **kw)
        self.proj_in = Dense(dim, **kw)
        self.embedding_proj_norm = LayerNorm(**kw) if c.embedding_proj_norm_type == "layer" else None
        self.embedding_proj = Dense(dim, **kw)
        self.encoder_hidden_states_proj = Dense(dim, **kw) if c.encoder_hid_proj_type == "linear" else None
        self.positional_embedding = layers.param(self, "positional_embedding",
                                                 (1, c.num_embeddings + c.additional_embeddings, dim),
                                                 (None, None, "embed"), param_dtype=self.param_dtype)
        self.prd_embedding = (layers.param(self, "prd_embedding", (1, 1, dim), (None, None, "embed"),
                                           param_dtype=self.param_dtype) if c.added_emb_type == "prd" else None)
        self.transformer_blocks = [TransformerBlock(c.num_attention_heads, c.attention_head_dim, c.dropout, **kw)
                                   for _ in range(c.num_layers)]
        self.norm_in = LayerNorm(**kw) if c.norm_in_type == "layer" else None
        self.norm_out = LayerNorm(**kw)
        self.proj_to_clip_embeddings = Dense(clip_dim, axes=("mlp", "embed"), **kw)
        self.clip_mean = layers.param(self, "clip_mean", (1, clip_dim), (None, "embed"), param_dtype=self.param_dtype)
        self.clip_std = layers.param(self, "clip_std", (1, clip_dim), (None, "embed"),
                                     init=nn.initializers.ones_init(), param_dtype=self.param_dtype)

    def __call__(self, hidden_states, timestep, proj_embedding, encoder_hidden_states=None, attention_mask=None,
                 deterministic: bool = True):
        c = self.config
        b = hidden_states.shape[0] if hidden_states.ndim else 0
        check_shape("hidden_states", hidden_states, (None, c.embedding_dim), "(batch, embedding_dim)")
        check_shape("proj_embedding", proj_embedding, (b, c.embedding_proj_dim or c.embedding_dim),
                    "(batch, embedding_proj_dim)")
        t = layers.broadcast_timesteps(timestep, b)

        time_emb = layers.timestep_embedding(t, c.inner_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        time_emb = self.time_embedding(time_emb.astype(self.dtype))
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens = []
        if self.encoder_hidden_states_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("this prior projects text hidden states: pass encoder_hidden_states of shape "
                                 f"(batch, {c.num_embeddings}, {c.embedding_dim})")
            check_shape("encoder_hidden_states", encoder_hidden_states, (b, c.num_embeddings, c.embedding_dim),
                        "(batch, num_embeddings, embedding_dim)")
            tokens.append(self.encoder_hidden_states_proj(encoder_hidden_states))
        n_before = sum(x.shape[1] for x in tokens) + 2  # text tokens, the embedding token and the time token
        tokens += [self.embedding_proj(proj_embedding)[:, None], time_emb[:, None], self.proj_in(hidden_states)[:, None]]
        if self.prd_embedding is not None:
            tokens.append(jnp.broadcast_to(self.prd_embedding.astype(self.dtype), (b, 1, c.inner_dim)))
        x = jnp.concatenate([tok.astype(self.dtype) for tok in tokens], axis=1)
        s = x.shape[1]

        pos = self.positional_embedding.astype(self.dtype)
        if pos.shape[1] < s:  # as the reference: zeros for the conditioning tokens and the prd token
            pos = jnp.pad(pos, ((0, 0), (n_before, 1 if self.prd_embedding is not None else 0), (0, 0)))
        if pos.shape[1] != s:
            raise ValueError(f"the prior's sequence has {s} tokens but its positional table has {pos.shape[1]} "
                             f"(num_embeddings + additional_embeddings = {c.num_embeddings} + {c.additional_embeddings})")
        x = x + pos

        # Additive masks, as the reference builds them: -10000 for padding and for the future.
        causal = jnp.triu(jnp.full((s, s), -10000.0, jnp.float32), k=1)
        if attention_mask is not None:
            n_text = s - c.additional_embeddings
            check_shape("attention_mask", attention_mask, (b, n_text), "(batch, num_embeddings)")
            pad = (1.0 - attention_mask.astype(jnp.float32)) * -10000.0
            pad = jnp.pad(pad, ((0, 0), (0, c.additional_embeddings)))
            bias = (pad[:, None, :] + causal[None])[:, None]  # (B, 1, S, S)
        else:
            bias = causal[None, None]

        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, bias, deterministic)
        x = self.norm_out(x)
        out = x[:, -1] if self.prd_embedding is not None else x[:, n_before]
        return self.proj_to_clip_embeddings(out).astype(jnp.float32)

    def unnormalize(self, x):
        """Prior samples -> CLIP image embeddings: x * clip_std + clip_mean (diffusers post_process_latents)."""
        return x * self.clip_std.astype(jnp.float32) + self.clip_mean.astype(jnp.float32)

    def normalize(self, x):
        """CLIP image embeddings -> the prior's space, for training: (x - clip_mean) / clip_std."""
        return (x - self.clip_mean.astype(jnp.float32)) / self.clip_std.astype(jnp.float32)
