"""One configurable UNet for the unCLIP decoder and the super-resolution upsamplers (paper sections 2.1, 2.3).

    decoder          = UNet(UNetConfig.from_dict(<diffusers UNet2DConditionModel config.json>))
    super_res_first  = UNet(UNetConfig.from_dict(<diffusers UNet2DModel config.json>))

The decoder (GLIDE-style) conditions on the timestep plus the projected CLIP image embedding, added to the
time embedding as `class_labels` (class_embed_type "identity"), and attends to context tokens through
"added KV" attention at the three lower resolutions. The upsamplers condition on the timestep only (the
low-resolution image is concatenated on channels by the caller) and have no attention.

Layout is NHWC throughout: sample (B, H, W, C_in) -> (B, H, W, C_out).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import layers
from unclip_jax.models.unet_blocks import AttentionSpec, DownBlock, MidBlock, ResnetSpec, UpBlock

Dtype = Any

COND = "UNet2DConditionModel"
PLAIN = "UNet2DModel"

# The diffusers __init__ arguments and their defaults (diffusers 0.3x), per class. tests/test_unet.py checks
# these tables against the installed diffusers with inspect.signature.
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    COND: {
        "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
        "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
        "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
        "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
        "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
        "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": None, "attention_type": "default",
        "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64,
    },
    PLAIN: {
        "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
        "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
        "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
        "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
        "num_class_embeds": None, "num_train_timesteps": None,
    },
}

# Arguments we implement, per class (they become UNetConfig fields of the same name).
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    COND: ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
           "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
           "layers_per_block", "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups", "norm_eps",
           "cross_attention_dim", "attention_head_dim", "class_embed_type", "resnet_time_scale_shift",
           "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_type", "time_embedding_dim",
           "time_embedding_act_fn", "conv_in_kernel", "conv_out_kernel", "mid_block_only_cross_attention",
           "cross_attention_norm"),
    PLAIN: ("sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type",
            "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type",
            "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor", "dropout", "act_fn",
            "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift",
            "add_attention", "class_embed_type"),
}

# Arguments that change nothing for the block types we support (they configure other block types), so
# any value is accepted and dropped; `to_dict` leaves them out.
NO_EFFECT: dict[str, tuple[str, ...]] = {
    COND: ("downsample_padding", "transformer_layers_per_block", "dual_cross_attention", "use_linear_projection",
           "upcast_attention", "addition_embed_type_num_heads"),
    PLAIN: ("downsample_padding", "downsample_type", "upsample_type", "num_train_timesteps"),
}
# Everything else is accepted only at its diffusers default.

SUPPORTED = {
    "down_block_types": {COND: ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                         PLAIN: ("ResnetDownsampleBlock2D",)},
    "up_block_types": {COND: ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
                       PLAIN: ("ResnetUpsampleBlock2D",)},
    "mid_block_type": {COND: ("UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D", None),
                       PLAIN: ("UNetMidBlock2D", None)},
    "class_embed_type": {COND: (None, "identity"), PLAIN: (None, "identity")},
    "resnet_time_scale_shift": {COND: ("default", "scale_shift"), PLAIN: ("default", "scale_shift")},
    "time_embedding_type": {COND: ("positional",), PLAIN: ("positional",)},
    "cross_attention_norm": {COND: (None, "group_norm")},
    "act_fn": {COND: ("silu", "swish", "gelu", "relu", "mish"), PLAIN: ("silu", "swish", "gelu", "relu", "mish")},
    "time_embedding_act_fn": {COND: (None, "silu", "swish", "gelu", "relu", "mish")},
}

# Karlo v1 alpha (kakaobrain/karlo-v1-alpha), the public unCLIP weights.
KARLO_DECODER_CONFIG: dict[str, Any] = {
    "_class_name": COND, "sample_size": 64, "in_channels": 3, "out_channels": 6,
    "block_out_channels": [320, 640, 960, 1280], "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "attention_head_dim": 64, "cross_attention_dim": 1536,
    "class_embed_type": "identity", "resnet_time_scale_shift": "scale_shift", "norm_num_groups": 32,
    "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1,
    "mid_block_scale_factor": 1, "only_cross_attention": False, "center_input_sample": False,
    "dual_cross_attention": False, "num_class_embeds": None, "upcast_attention": False,
    "use_linear_projection": False,
}
KARLO_SUPER_RES_CONFIG: dict[str, Any] = {
    "_class_name": PLAIN, "sample_size": 256, "in_channels": 6, "out_channels": 3,
    "block_out_channels": [320, 640, 960, 1280], "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 4, "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    "mid_block_type": "UNetMidBlock2D", "add_attention": False, "attention_head_dim": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "flip_sin_to_cos": True,
    "freq_shift": 0, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
}


def _freeze(v):
    """JSON lists -> tuples (hashable, comparable); everything else as is."""
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def _per_block(name: str, value, n: int, kind) -> tuple:
    """An int/bool (same for every block) or a list of n of them -> a tuple of n."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries {list(value)}; expected one per block ({n})")
        values = value
    else:
        values = (value,) * n
    for v in values:
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ValueError(f"{name} must be a {kind.__name__} or a list of them, got {_thaw(value)!r}")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet's architecture in diffusers' own terms (config.json keys of UNet2DConditionModel / UNet2DModel).

    `reference_class` is the diffusers class the config describes ("UNet2DConditionModel" for the decoder,
    "UNet2DModel" for the upsamplers); it decides a few details the two classes do differently (the
    UNet2DModel time MLP and output activation are always SiLU, its mid block has two resnets, ...).
    Fields that one class does not have keep their defaults here (e.g. cross_attention_dim None for
    UNet2DModel). Defaults are Karlo's decoder. Build one with `from_dict(config_json_dict)`.
    """
    reference_class: str = COND
    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 3
    out_channels: int = 6
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = tuple(KARLO_DECODER_CONFIG["down_block_types"])
    mid_block_type: str | None = "UNetMidBlock2DSimpleCrossAttn"
    up_block_types: tuple[str, ...] = tuple(KARLO_DECODER_CONFIG["up_block_types"])
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 960, 1280)
    layers_per_block: int | tuple[int, ...] = 3
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] | None = 1536
    attention_head_dim: int | tuple[int, ...] | None = 64
    class_embed_type: str | None = "identity"
    resnet_time_scale_shift: str = "scale_shift"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    add_attention: bool = False              # UNet2DModel only: self-attention in the mid block
    attn_norm_num_groups: int | None = None  # UNet2DModel only: that attention's GroupNorm groups

    def __post_init__(self):
        cls = self.reference_class
        if cls not in (COND, PLAIN):
            raise ValueError(f"unclip_jax's UNet reproduces {COND} or {PLAIN}, not {cls!r}")
        for key, table in SUPPORTED.items():
            if cls not in table:
                continue
            values = self.__dict__[key]
            for v in (values if isinstance(values, tuple) else (values,)):
                if v not in table[cls]:
                    what = f"{key} entry" if isinstance(values, tuple) else key
                    raise ValueError(f"unclip_jax's UNet does not support {what} {v!r} (for {cls}); supported: "
                                     f"{', '.join(repr(s) for s in table[cls])}")
        n = len(self.block_out_channels)
        if n < 1 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"block_out_channels {list(self.block_out_channels)}, down_block_types "
                             f"{list(self.down_block_types)} and up_block_types {list(self.up_block_types)} must "
                             "have one entry per resolution each")
        _per_block("block_out_channels", self.block_out_channels, n, int)
        _per_block("layers_per_block", self.layers_per_block, n, int)
        if cls == PLAIN and not isinstance(self.layers_per_block, int):
            raise ValueError(f"{PLAIN} takes one int layers_per_block, got {_thaw(self.layers_per_block)!r}")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"norm_num_groups must be a positive int, got {groups!r}")
        for c in self.block_out_channels:
            if c < 1 or c % groups:
                raise ValueError(f"block_out_channels {list(self.block_out_channels)}: every entry must be a "
                                 f"positive multiple of norm_num_groups ({groups})")
        for k in ("in_channels", "out_channels"):
            if self.__dict__[k] < 1:
                raise ValueError(f"{k} must be positive, got {self.__dict__[k]}")
        for k in ("conv_in_kernel", "conv_out_kernel"):
            if self.__dict__[k] < 1 or self.__dict__[k] % 2 == 0:
                raise ValueError(f"{k} must be a positive odd number (same-size padding), got {self.__dict__[k]}")
        if cls == COND:
            _per_block("only_cross_attention", self.only_cross_attention, n, bool)
            dims = _per_block("cross_attention_dim", self.cross_attention_dim, n, int)
            if len(set(dims)) > 1:
                raise ValueError(f"cross_attention_dim {list(dims)}: unclip_jax needs the same context width in "
                                 "every block (one encoder_hidden_states serves them all)")
            if self.cross_attention_norm == "group_norm" and dims[0] % 32:
                raise ValueError(f"cross_attention_norm 'group_norm' uses 32 groups; cross_attention_dim "
                                 f"{dims[0]} is not a multiple of 32")
            _per_block("attention_head_dim", self.attention_head_dim, n, int)
        elif self.attention_head_dim is not None:
            _per_block("attention_head_dim", self.attention_head_dim, 1, int)
        reversed_channels = self.block_out_channels[::-1]
        for channels, spec in ([(self.block_out_channels[i], self.down_attention(i)) for i in range(n)] +
                               [(reversed_channels[i], self.up_attention(i)) for i in range(n)] +
                               [(self.block_out_channels[-1], self.mid_attention())]):
            if spec is None:
                continue
            # diffusers' added-KV processor reshapes heads * head_dim back to the block's channels.
            if spec.heads < 1 or (spec.added_kv and channels % spec.dim_head):
                raise ValueError(f"attention_head_dim {_thaw(self.attention_head_dim)!r} does not divide the "
                                 f"{channels} channels of an attention block (block_out_channels "
                                 f"{list(self.block_out_channels)}; up block i uses attention_head_dim[i], "
                                 "not reversed)")
        if self.mid_attention() is not None and self.mid_attention().norm_groups is not None:
            if self.block_out_channels[-1] % self.mid_attention().norm_groups:
                raise ValueError(f"attn_norm_num_groups {self.attn_norm_num_groups} does not divide "
                                 f"{self.block_out_channels[-1]} channels")

    # ---------------------------------------------------------------- reading and writing config.json

    @classmethod
    def class_of(cls, d: dict) -> str:
        """Which diffusers class a config dict describes.

        `_class_name` when present. Without it: UNet2DConditionModel if the dict has a key only that class
        takes (cross_attention_dim, ...) or a cross-attention block; UNet2DModel if it has a key only that
        class takes (add_attention, ...); UNet2DConditionModel (the decoder) otherwise.
        """
        if d.get("_class_name"):
            return d["_class_name"]
        keys = {k for k in d if not k.startswith("_")}
        only_cond = keys & (set(DIFFUSERS_DEFAULTS[COND]) - set(DIFFUSERS_DEFAULTS[PLAIN]))
        only_plain = keys & (set(DIFFUSERS_DEFAULTS[PLAIN]) - set(DIFFUSERS_DEFAULTS[COND]))
        blocks = list(d.get("down_block_types") or []) + list(d.get("up_block_types") or [])
        if only_cond or any("CrossAttn" in b for b in blocks):
            if only_plain:
                raise ValueError(f"config mixes {COND} keys {sorted(only_cond)} and {PLAIN} keys "
                                 f"{sorted(only_plain)}; add _class_name to say which it is")
            return COND
        return PLAIN if only_plain else COND

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """A diffusers UNet2DConditionModel / UNet2DModel config.json dict -> UNetConfig.

        Strict: an option we do not implement raises a ValueError naming it unless it has its diffusers
        default value. Keys starting with "_" are metadata and ignored; keys the diffusers class does not
        take are ignored with a warning (as diffusers does).
        """
        ref = cls.class_of(d)
        if ref not in (COND, PLAIN):
            raise ValueError(f"unclip_jax's UNet reproduces {COND} or {PLAIN}, not {ref!r}")
        defaults = DIFFUSERS_DEFAULTS[ref]
        given = {k: _freeze(v) for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            warnings.warn(f"config keys {unknown} are not {ref} arguments; ignored", stacklevel=2)
        for k, v in given.items():
            if k in defaults and k not in IMPLEMENTED[ref] and k not in NO_EFFECT[ref] and v != defaults[k]:
                raise ValueError(f"unclip_jax's UNet does not support {k}={_thaw(v)!r} ({ref}); only the diffusers "
                                 f"default {_thaw(defaults[k])!r} is accepted")
        values = {k: given.get(k, defaults[k]) for k in IMPLEMENTED[ref]}
        if ref == PLAIN:  # what UNet2DConditionModel-only fields mean for a UNet2DModel
            values.update(cross_attention_dim=None, only_cross_attention=False, resnet_skip_time_act=False,
                          resnet_out_scale_factor=1.0)
        else:
            values.update(add_attention=False, attn_norm_num_groups=None)
        return cls(reference_class=ref, **values)

    def to_dict(self) -> dict:
        """The config.json that diffusers' `from_pretrained` builds the same architecture from."""
        out = {"_class_name": self.reference_class}
        for k in IMPLEMENTED[self.reference_class]:
            out[k] = _thaw(self.__dict__[k])
        return out

    # ---------------------------------------------------------------- derived architecture

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def context_dim(self) -> int | None:
        """Width of encoder_hidden_states, or None for a UNet without cross-attention."""
        if not self.has_cross_attention:
            return None
        return _per_block("cross_attention_dim", self.cross_attention_dim, self.num_blocks, int)[0]

    @property
    def has_cross_attention(self) -> bool:
        return (self.reference_class == COND and
                ("SimpleCrossAttnDownBlock2D" in self.down_block_types or "SimpleCrossAttnUpBlock2D" in
                 self.up_block_types or self.mid_block_type == "UNetMidBlock2DSimpleCrossAttn"))

    def _layers(self) -> tuple[int, ...]:
        return _per_block("layers_per_block", self.layers_per_block, self.num_blocks, int)

    def _head_dim(self, i: int) -> int | None:
        if self.attention_head_dim is None:
            return None
        if isinstance(self.attention_head_dim, tuple):
            return self.attention_head_dim[i]
        return self.attention_head_dim

    def _only_cross(self) -> tuple[bool, ...]:
        return _per_block("only_cross_attention", self.only_cross_attention, self.num_blocks, bool)

    def resnet_spec(self, *, mid: bool = False) -> ResnetSpec:
        plain = self.reference_class == PLAIN
        # UNetMidBlock2D is built without resnet_skip_time_act; UNet2DModel never passes either option.
        skip_act = self.resnet_skip_time_act and not (mid and self.mid_block_type == "UNetMidBlock2D")
        scale = self.mid_block_scale_factor if mid else (1.0 if plain else self.resnet_out_scale_factor)
        return ResnetSpec(groups=self.norm_num_groups, eps=self.norm_eps, act_fn=self.act_fn,
                          time_embedding_norm=self.resnet_time_scale_shift, skip_time_act=skip_act,
                          output_scale_factor=float(scale), dropout=float(self.dropout))

    def _added_kv(self, channels: int, head_dim: int | None, only_cross: bool) -> AttentionSpec:
        head_dim = head_dim if head_dim is not None else channels
        # diffusers' Attention default eps (1e-5), not norm_eps, for this GroupNorm.
        return AttentionSpec(heads=channels // head_dim, dim_head=head_dim, norm_groups=self.norm_num_groups,
                             norm_eps=1e-5, added_kv=True, only_cross_attention=only_cross,
                             cross_attention_norm=self.cross_attention_norm)

    def down_attention(self, i: int) -> AttentionSpec | None:
        if self.down_block_types[i] != "SimpleCrossAttnDownBlock2D":
            return None
        return self._added_kv(self.block_out_channels[i], self._head_dim(i), self._only_cross()[i])

    def up_attention(self, i: int) -> AttentionSpec | None:
        """Up block i (deepest first). Note: diffusers gives it attention_head_dim[i], NOT reversed."""
        if self.up_block_types[i] != "SimpleCrossAttnUpBlock2D":
            return None
        out = self.block_out_channels[::-1][i]
        return self._added_kv(out, self._head_dim(i), self._only_cross()[::-1][i])

    def mid_attention(self) -> AttentionSpec | None:
        c = self.block_out_channels[-1]
        if self.mid_block_type == "UNetMidBlock2DSimpleCrossAttn":
            only = self.mid_block_only_cross_attention
            if only is None:
                only = self.only_cross_attention if isinstance(self.only_cross_attention, bool) else False
            return self._added_kv(c, self._head_dim(self.num_blocks - 1), bool(only))
        if self.reference_class == PLAIN and self.mid_block_type is not None and self.add_attention:
            head_dim = self._head_dim(0) or c
            groups = self.attn_norm_num_groups
            if groups is None:
                groups = self.norm_num_groups if self.resnet_time_scale_shift == "default" else None
            return AttentionSpec(heads=c // head_dim, dim_head=head_dim, norm_groups=groups,
                                 norm_eps=self.norm_eps, rescale_output_factor=float(self.mid_block_scale_factor))
        return None


class UNet(nn.Module):
    """The unCLIP decoder / upsampler UNet (diffusers UNet2DConditionModel / UNet2DModel), NHWC.

    __call__(sample, timestep, encoder_hidden_states=None, class_labels=None, attention_mask=None,
             deterministic=True)
      sample: (B, H, W, in_channels), H and W multiples of 2**(len(block_out_channels) - 1)
      timestep: scalar or (B,)
      encoder_hidden_states: (B, S, cross_attention_dim), required when the UNet has cross-attention
      class_labels: (B, time_embed_dim), added to the time embedding (class_embed_type "identity": the
          decoder's projected CLIP embedding); required exactly when class_embed_type is set
      attention_mask: (B, S), True/1 = attend to that context token; becomes a -10000 additive bias
      deterministic: False applies dropout (config.dropout) with the "dropout" rng
    Returns (B, H, W, out_channels) in `dtype`.

    `remat=True` rematerialises every resnet and attention block in the backward pass (training memory).
    """
    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    CONFIG_CLASS = UNetConfig
    REFERENCE_CLASSES = (COND, PLAIN)
    CHECKPOINT_RULES = ()          # every key follows from the submodule names
    IGNORED_CHECKPOINT_KEYS = ()   # the reference UNets have no buffers

    def dummy_inputs(self, batch_size: int = 1) -> dict:
        cfg = self.config
        size = 2 ** (cfg.num_blocks - 1)
        inputs = {"sample": jnp.zeros((batch_size, size, size, cfg.in_channels), jnp.float32),
                  "timestep": jnp.zeros((batch_size,), jnp.int32)}
        if cfg.has_cross_attention:
            inputs["encoder_hidden_states"] = jnp.zeros((batch_size, 2, cfg.context_dim), jnp.float32)
        if cfg.class_embed_type == "identity":
            inputs["class_labels"] = jnp.zeros((batch_size, cfg.time_embed_dim), jnp.float32)
        return inputs

    def _check_inputs(self, sample, encoder_hidden_states, class_labels, attention_mask):
        cfg = self.config
        c = cfg.in_channels
        if np.ndim(sample) != 4 or np.shape(sample)[-1] != c:
            hint = ""
            if np.ndim(sample) == 4 and np.shape(sample)[1] == c:
                hint = " (this looks like NCHW; unclip_jax is NHWC: use sample.transpose(0, 2, 3, 1))"
            layers.check_shape("sample", sample, (None, None, None, c), f"(batch, height, width, {c} channels)" + hint)
        b, h, w, _ = np.shape(sample)
        factor = 2 ** (cfg.num_blocks - 1)
        if h % factor or w % factor:
            raise ValueError(f"sample has shape {tuple(np.shape(sample))}; height and width must be multiples of "
                             f"{factor} (this UNet halves the resolution {cfg.num_blocks - 1} times)")
        if cfg.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(f"this UNet has cross-attention: pass encoder_hidden_states of shape "
                                 f"({b}, S, {cfg.context_dim}) = (batch, context tokens, cross_attention_dim)")
            layers.check_shape("encoder_hidden_states", encoder_hidden_states, (b, None, cfg.context_dim),
                               "(batch, context tokens, cross_attention_dim)")
            if attention_mask is not None:
                s = np.shape(encoder_hidden_states)[1]
                layers.check_shape("attention_mask", attention_mask, (b, s),
                                   "(batch, context tokens of encoder_hidden_states)")
        else:
            for name, x in (("encoder_hidden_states", encoder_hidden_states), ("attention_mask", attention_mask)):
                if x is not None:
                    raise ValueError(f"{name} was given but this UNet ({cfg.reference_class}, blocks "
                                     f"{list(cfg.down_block_types)}) has no cross-attention")
        if cfg.class_embed_type == "identity":
            if class_labels is None:
                raise ValueError(f"class_embed_type is 'identity': pass class_labels of shape ({b}, "
                                 f"{cfg.time_embed_dim}), the embedding added to the time embedding")
            layers.check_shape("class_labels", class_labels, (b, cfg.time_embed_dim), "(batch, time_embed_dim)")
        elif class_labels is not None:
            raise ValueError("class_labels was given but this UNet has no class embedding (class_embed_type None)")

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, attention_mask=None,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        self._check_inputs(sample, encoder_hidden_states, class_labels, attention_mask)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        plain = cfg.reference_class == PLAIN
        sample = jnp.asarray(sample, self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # Time (+ class) embedding, (B, time_embed_dim).
        t = layers.broadcast_timesteps(timestep, sample.shape[0])
        t_feat = layers.timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                           downscale_freq_shift=cfg.freq_shift)
        emb = layers.TimestepEmbedding(cfg.time_embed_dim, act_fn="silu" if plain else cfg.act_fn,
                                       name="time_embedding", **kw)(t_feat.astype(self.dtype))
        if cfg.class_embed_type == "identity":
            emb = emb + jnp.asarray(class_labels, self.dtype)
        if cfg.time_embedding_act_fn is not None:
            emb = layers.activation(cfg.time_embedding_act_fn)(emb)

        context = bias = None
        if cfg.has_cross_attention:
            context = jnp.asarray(encoder_hidden_states, self.dtype)
            if attention_mask is not None:  # (B, S) keep-mask -> (B, 1, 1, S) additive bias
                keep = jnp.asarray(attention_mask).astype(jnp.float32)
                bias = ((1.0 - keep) * -10000.0)[:, None, None, :]

        pad = (cfg.conv_in_kernel - 1) // 2
        h = layers.Conv(cfg.block_out_channels[0], cfg.conv_in_kernel, padding=pad, name="conv_in", **kw)(sample)

        n, blocks = cfg.num_blocks, dict(remat=self.remat, **kw)
        layers_per_block = cfg._layers()
        skips = [h]
        for i in range(n):
            h, block_skips = DownBlock(layers_per_block[i], cfg.block_out_channels[i], add_downsample=i < n - 1,
                                       resnet=cfg.resnet_spec(), attention=cfg.down_attention(i),
                                       name=f"down_blocks_{i}", **blocks)(h, emb, context, bias, deterministic)
            skips.extend(block_skips)

        if cfg.mid_block_type is not None:
            mid_layers = 0 if (cfg.mid_block_type == "UNetMidBlock2D" and not plain) else 1
            h = MidBlock(cfg.block_out_channels[-1], mid_layers, resnet=cfg.resnet_spec(mid=True),
                         attention=cfg.mid_attention(), name="mid_block", **blocks)(h, emb, context, bias,
                                                                                     deterministic)

        reversed_channels = cfg.block_out_channels[::-1]
        for i in range(n):
            num = layers_per_block[::-1][i] + 1
            block_skips, skips = skips[-num:], skips[:-num]
            h = UpBlock(num, reversed_channels[i], add_upsample=i < n - 1, resnet=cfg.resnet_spec(),
                        attention=cfg.up_attention(i), name=f"up_blocks_{i}", **blocks)(
                h, block_skips, emb, context, bias, deterministic)

        h = layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h)
        h = layers.activation("silu" if plain else cfg.act_fn)(h)
        pad = (cfg.conv_out_kernel - 1) // 2
        return layers.Conv(cfg.out_channels, cfg.conv_out_kernel, padding=pad, name="conv_out", **kw)(h)
