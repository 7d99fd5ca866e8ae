"""The unCLIP model stack in Flax Linen (NHWC), configured from diffusers / transformers configs.

Every model class follows one protocol, which the checkpoint code (`unclip_jax.convert`) relies on:

- a `config` field of type `CONFIG_CLASS`, a frozen dataclass with `from_dict(dict)` (strict: an option we do not implement
  is an error that names it) and `to_dict()` (the config.json the PyTorch reference reads);
- `dtype` (compute) and `param_dtype` fields;
- `dummy_inputs(batch_size)`: keyword arguments for `init`;
- class attributes `REFERENCE_CLASSES` (the diffusers / transformers class names it stands for),
  `CHECKPOINT_RULES` (conversion rules in front of the defaults) and `IGNORED_CHECKPOINT_KEYS`
  (regexes of reference keys that are buffers, not parameters).
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# component name -> (module, class)
COMPONENTS: dict[str, tuple[str, str]] = {
    "prior": ("unclip_jax.models.prior", "PriorTransformer"),
    "text_proj": ("unclip_jax.models.text_proj", "UnCLIPTextProj"),
    "decoder": ("unclip_jax.models.unet", "UNet"),
    "super_res_first": ("unclip_jax.models.unet", "UNet"),
    "super_res_last": ("unclip_jax.models.unet", "UNet"),
    "text_encoder": ("unclip_jax.models.clip", "CLIPTextModelWithProjection"),
    "image_encoder": ("unclip_jax.models.clip", "CLIPVisionModelWithProjection"),
}


def model_class(name: str):
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; expected one of {', '.join(COMPONENTS)}")
    module, cls = COMPONENTS[name]
    return getattr(importlib.import_module(module), cls)


def reference_class_name(config: dict) -> str | None:
    """The diffusers `_class_name` or the first transformers `architectures` entry, if any."""
    if config.get("_class_name"):
        return config["_class_name"]
    arch = config.get("architectures") or []
    return arch[0] if arch else None


def from_config(name: str, config: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> nn.Module:
    """The Flax module for component `name` (prior, decoder, ...) from its diffusers/transformers config dict."""
    cls = model_class(name)
    ref = reference_class_name(config)
    if ref is not None and ref not in cls.REFERENCE_CLASSES:
        raise ValueError(f"component {name!r} expects a config of class {' or '.join(cls.REFERENCE_CLASSES)}, "
                         f"got {ref!r}")
    return cls(config=cls.CONFIG_CLASS.from_dict(config), dtype=dtype, param_dtype=param_dtype)


def init_params(module: nn.Module, rng: jax.Array, batch_size: int = 1):
    """Randomly initialised parameters (unboxed), e.g. to train from scratch."""
    variables = module.init(rng, **module.dummy_inputs(batch_size))
    return nn.meta.unbox(variables["params"])


def abstract_params(module: nn.Module):
    """(shapes, logical axes) of the module's parameters, computed without allocating them."""
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **module.dummy_inputs(1))["params"])
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def count_params(module: nn.Module) -> int:
    shapes, _ = abstract_params(module)
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes))
