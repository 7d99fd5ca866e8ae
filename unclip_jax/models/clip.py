"""The CLIP text and image towers unCLIP conditions on (paper section 2), as transformers builds them.

    text:  input_ids (B, L) -> CLIPTextOutput(text_embeds (B, P), last_hidden_state (B, L, D), pooler_output (B, D))
    image: pixel_values (B, S, S, 3) NHWC -> CLIPVisionOutput(image_embeds (B, P), last_hidden_state (B, 1 + N, D),
           pooler_output (B, D))

Karlo uses ViT-L/14: text D = 768, L = 77, P = 768 (`text_encoder`); image D = 1024, S = 224, 14 px patches,
N = 256, P = 768 (`image_encoder`). Submodule names are transformers' own (`text_model/encoder/layers_3/
self_attn/q_proj`), so `unclip_jax.convert` maps `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`
checkpoints, and full `CLIPModel` checkpoints, with its default rules.

The towers are frozen in unCLIP, so they are inference-only: dropout settings are read and kept for `to_dict`, never
applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import layers

Dtype = Any

# Keys of the other tower or of the full CLIPModel: present when loading a full CLIP checkpoint, unused here.
_TEXT_ONLY_KEYS = (r"text_model\..*", r"text_projection\..*")
_VISION_ONLY_KEYS = (r"vision_model\..*", r"visual_projection\..*")


# ------------------------------------------------------------------------------------------------ configs

def _tower_dict(d: dict, sub: str, model_type: str) -> dict:
    """The tower's own config dict from a tower config.json or a full "clip" config.json."""
    d = dict(d)
    if d.get("model_type") == "clip" or sub in d or f"{sub}_dict" in d:
        top_projection = d.get("projection_dim")
        # Old CLIP configs keep (some of) the tower's values in `text_config_dict`, which take precedence.
        parts = [d.get(sub), d.get(f"{sub}_dict")]
        if not any(isinstance(p, dict) for p in parts):
            raise ValueError(f"a full CLIP config needs a {sub!r} dict to build the {model_type} tower")
        d = {k: v for p in parts if isinstance(p, dict) for k, v in p.items()}
        if top_projection is not None:  # CLIPModel sizes its projections from the top-level value
            d["projection_dim"] = top_projection
    if d.get("model_type", model_type) != model_type:
        raise ValueError(f"model_type={d['model_type']!r}; expected {model_type!r} (or a full 'clip' config)")
    if d.get("pruned_heads"):
        raise ValueError(f"pruned_heads={d['pruned_heads']!r} is not supported; expected none")
    return d


def _read_fields(cls, d: dict) -> dict:
    """Values of the dataclass fields present in d (missing ones take transformers' defaults).

    Every other key (`_name_or_path`, `dtype`, `id2label`, generation settings...) is one transformers' CLIP
    ignores too, so ignoring it cannot make us compute something else; the fields themselves are validated.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _check_int(cfg, *names, minimum: int = 1) -> None:
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ValueError(f"{n}={v!r} is not supported; expected an integer >= {minimum}")


def _check_common(cfg) -> None:
    _check_int(cfg, "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} is not a multiple of num_attention_heads="
                         f"{cfg.num_attention_heads}")
    if cfg.hidden_act not in layers.ACTIVATIONS:
        raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; expected one of "
                         f"{sorted(layers.ACTIVATIONS)}")
    if not isinstance(cfg.layer_norm_eps, (int, float)) or isinstance(cfg.layer_norm_eps, bool) \
            or cfg.layer_norm_eps <= 0:
        raise ValueError(f"layer_norm_eps={cfg.layer_norm_eps!r} is not supported; expected a positive number")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig (same names and defaults)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # kept for to_dict; inference-only, never applied
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    # The pooled token: the first eos_token_id, or for the legacy value 2 (Karlo's config) the largest id.
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """From a `clip_text_model` config.json dict, or the `text_config` of a full `clip` one."""
        return cls(**_read_fields(cls, _tower_dict(d, "text_config", "clip_text_model")))

    def __post_init__(self):
        _check_common(self)
        _check_int(self, "vocab_size", "max_position_embeddings")
        _check_int(self, "eos_token_id", minimum=0)

    def to_dict(self) -> dict:
        return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
                **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig (same names and defaults)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # kept for to_dict; inference-only, never applied
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        """From a `clip_vision_model` config.json dict, or the `vision_config` of a full `clip` one."""
        return cls(**_read_fields(cls, _tower_dict(d, "vision_config", "clip_vision_model")))

    def __post_init__(self):
        _check_common(self)
        _check_int(self, "num_channels", "image_size", "patch_size")  # lists/tuples: the reference cannot run them
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size={self.patch_size} is larger than image_size={self.image_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                **dataclasses.asdict(self)}


# ------------------------------------------------------------------------------------------------ outputs

@flax.struct.dataclass
class CLIPTextOutput:
    text_embeds: jax.Array        # (B, P) projected pooled token: the prompt embedding unCLIP conditions on
    last_hidden_state: jax.Array  # (B, L, D) after the final LayerNorm
    pooler_output: jax.Array      # (B, D) the pooled (eos) token, before the projection


@flax.struct.dataclass
class CLIPVisionOutput:
    image_embeds: jax.Array       # (B, P) projected class token: the image embedding z_i
    last_hidden_state: jax.Array  # (B, 1 + N, D) encoder output (no final norm, as in transformers)
    pooler_output: jax.Array      # (B, D) post_layernorm(class token), before the projection


# ------------------------------------------------------------------------------------------------ encoder

class CLIPAttention(nn.Module):
    """Multi-head self-attention, (B, T, D) -> (B, T, D); mask: bool, broadcastable to (B, 1, T, T)."""
    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)  # noqa: E731
        q = split(layers.Dense(cfg.hidden_size, name="q_proj", **kw)(x))
        k = split(layers.Dense(cfg.hidden_size, name="k_proj", **kw)(x))
        v = split(layers.Dense(cfg.hidden_size, name="v_proj", **kw)(x))
        out = layers.attention(q, k, v, mask=mask).reshape(x.shape[:-1] + (cfg.hidden_size,))
        return layers.Dense(cfg.hidden_size, axes=("mlp", "embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.Dense(self.config.intermediate_size, name="fc1", **kw)(x)
        x = layers.activation(self.config.hidden_act)(x)
        return layers.Dense(self.config.hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x)); (B, T, D) -> (B, T, D)."""
    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(cfg, name="self_attn", **kw)(h, mask)
        h = layers.LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(cfg, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` CLIPEncoderLayers, (B, T, D) -> (B, T, D); mask as CLIPAttention's."""
    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, name=f"layers_{i}", **kw)(x, mask)
        return x


# ------------------------------------------------------------------------------------------------ text tower

class _TextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding",
                                 **kw)(jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[1]
        x = _TextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]  # (B, 1, L, L)
        x = CLIPEncoder(cfg, name="encoder", **kw)(x, mask)
        x = layers.LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        if cfg.eos_token_id == 2:  # legacy configs (before transformers PR #24773): the end token has the largest id
            index = jnp.argmax(input_ids, axis=-1)
        else:  # the first end token (padding may reuse the end token's id)
            index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
        return x, pooled


class CLIPTextModelWithProjection(nn.Module):
    """CLIP's causal text transformer plus its projection (transformers' CLIPTextModelWithProjection).

    __call__(input_ids (B, L) int, attention_mask (B, L) 1 = token / 0 = padding, default all ones), L <= 77
    -> CLIPTextOutput(text_embeds (B, P), last_hidden_state (B, L, D), pooler_output (B, D)).
    Attention is causal and hides padded keys; the pooled token is the first `eos_token_id`, or the largest id
    for the legacy `eos_token_id == 2` (Karlo), exactly as transformers chooses it.
    """
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    CONFIG_CLASS = CLIPTextConfig
    REFERENCE_CLASSES = ("CLIPTextModelWithProjection", "CLIPModel")
    CHECKPOINT_RULES = ()
    # position_ids: a buffer older transformers saved; the rest: the vision half of a full CLIPModel checkpoint.
    IGNORED_CHECKPOINT_KEYS = (r"text_model\.embeddings\.position_ids", r"logit_scale") + _VISION_ONLY_KEYS

    def dummy_inputs(self, batch_size: int = 1) -> dict:
        return {"input_ids": jnp.zeros((batch_size, self.config.max_position_embeddings), jnp.int32)}

    @nn.compact
    def __call__(self, input_ids, attention_mask=None) -> CLIPTextOutput:
        cfg = self.config
        layers.check_shape("input_ids", input_ids, (None, None), "(batch, tokens)")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (B, L) with L <= "
                             f"{cfg.max_position_embeddings} = (batch, tokens up to max_position_embeddings); "
                             f"tokenize with max_length={cfg.max_position_embeddings} and truncation=True")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        layers.check_shape("attention_mask", attention_mask, input_ids.shape, "the shape of input_ids")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden, pooled = _TextTransformer(cfg, name="text_model", **kw)(input_ids, attention_mask)
        embeds = layers.Dense(cfg.projection_dim, use_bias=False, name="text_projection", **kw)(pooled)
        return CLIPTextOutput(text_embeds=embeds, last_hidden_state=hidden, pooler_output=pooled)


# ------------------------------------------------------------------------------------------------ image tower

class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patches = layers.Conv(cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, padding="VALID",
                              use_bias=False, name="patch_embedding", **kw)(pixel_values)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)  # row-major over the patch grid, as torch's flatten
        cls = layers.param(self, "class_embedding", (cfg.hidden_size,), ("embed",),
                           nn.initializers.normal(cfg.hidden_size ** -0.5), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (batch, 1, cfg.hidden_size))
        positions = layers.Embed(cfg.num_patches + 1, cfg.hidden_size, name="position_embedding",
                                 **kw)(jnp.arange(cfg.num_patches + 1))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class _VisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _VisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values)
        x = layers.LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # sic: transformers' name
        x = CLIPEncoder(cfg, name="encoder", **kw)(x)
        pooled = layers.LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


class CLIPVisionModelWithProjection(nn.Module):
    """CLIP's ViT image tower plus its projection (transformers' CLIPVisionModelWithProjection).

    __call__(pixel_values (B, S, S, C) NHWC, already normalised with the CLIP mean/std, S = image_size)
    -> CLIPVisionOutput(image_embeds (B, P), last_hidden_state (B, 1 + N, D), pooler_output (B, D)).
    """
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    CONFIG_CLASS = CLIPVisionConfig
    REFERENCE_CLASSES = ("CLIPVisionModelWithProjection", "CLIPModel")
    CHECKPOINT_RULES = ()
    IGNORED_CHECKPOINT_KEYS = (r"vision_model\.embeddings\.position_ids", r"logit_scale") + _TEXT_ONLY_KEYS

    def dummy_inputs(self, batch_size: int = 1) -> dict:
        s, c = self.config.image_size, self.config.num_channels
        return {"pixel_values": jnp.zeros((batch_size, s, s, c), jnp.float32)}

    @nn.compact
    def __call__(self, pixel_values) -> CLIPVisionOutput:
        cfg = self.config
        s, c = cfg.image_size, cfg.num_channels
        try:
            layers.check_shape("pixel_values", pixel_values, (None, s, s, c),
                               f"(batch, {s}, {s}, {c}) = (batch, height, width, channels), NHWC")
        except ValueError as e:
            shape = tuple(np.shape(pixel_values))
            hint = ("; it looks channels-first (NCHW): pass pixel_values.transpose(0, 2, 3, 1)"
                    if len(shape) == 4 and shape[1] == c and shape[-1] != c else
                    f"; resize and centre-crop images to {s} px (CLIPImageProcessor does)")
            raise ValueError(str(e) + hint) from None
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden, pooled = _VisionTransformer(cfg, name="vision_model", **kw)(pixel_values)
        embeds = layers.Dense(cfg.projection_dim, use_bias=False, name="visual_projection", **kw)(pooled)
        return CLIPVisionOutput(image_embeds=embeds, last_hidden_state=hidden, pooler_output=pooled)
