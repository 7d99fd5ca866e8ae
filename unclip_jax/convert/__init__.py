"""Loading diffusers / transformers checkpoints into unclip_jax and saving them back.

    module, params = unclip_jax.load_component("kakaobrain/karlo-v1-alpha", "prior")
    unclip_jax.save_component("out/", "prior", module, params)   # diffusers' from_pretrained reads it

Names and layouts are mapped by the table in `mapping.py`; any reference key that is missing,
unexpected or of the wrong shape is reported, all of them in one error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from unclip_jax.convert.io import (CheckpointError, component_folder, open_weights, read_config,
                                   resolve_folder)
from unclip_jax.convert.mapping import flatten, flax_path_to_key, unflatten
from unclip_jax.models import abstract_params, from_config

__all__ = ["CheckpointError", "load_component", "save_component", "convert_state", "export_state"]


def _key_table(module) -> dict[str, tuple[str, Any, Any]]:
    """flax path -> (reference key, transform, abstract array) for every parameter of `module`."""
    shapes, _ = abstract_params(module)
    rules = tuple(getattr(module, "CHECKPOINT_RULES", ()))
    table = {}
    for path, leaf in flatten(shapes).items():
        key, transform = flax_path_to_key(path, rules)
        table[path] = (key, transform, leaf)
    return table


def convert_state(module, reader, *, param_dtype: Any = None, where: str = "checkpoint",
                  put: Callable[[str, np.ndarray], jax.Array] | None = None, progress: bool | None = None):
    """Reference tensors (a reader with keys/shape/get, or a plain dict of arrays) -> Flax params.

    One tensor at a time: it is read, transformed, checked and placed (by `put(path, array)`,
    default `jax.device_put`) before the next is read. Raises CheckpointError listing every
    missing, unexpected and mis-shaped key.
    """
    if isinstance(reader, dict):
        reader = _DictReader(reader)
    table = _key_table(module)
    ignored = [re.compile(p) for p in getattr(module, "IGNORED_CHECKPOINT_KEYS", ())]
    available = set(reader.keys())
    wanted = {key for key, _, _ in table.values()}
    missing = sorted(wanted - available)
    unexpected = sorted(k for k in available - wanted if not any(p.fullmatch(k) for p in ignored))
    misshaped = []
    for path, (key, transform, leaf) in table.items():
        if key in available:
            src_shape = reader.shape(key)
            flax_shape = transform.to_flax(np.empty(src_shape, np.uint8)).shape  # layout only, no data
            if tuple(flax_shape) != tuple(leaf.shape):
                want = transform.to_torch(np.empty(leaf.shape, np.uint8)).shape
                misshaped.append(f"{key}: checkpoint {tuple(src_shape)}, model expects {tuple(want)}")
    if missing or unexpected or misshaped:
        parts = [f"{where} does not fit {type(module).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"  {len(items)} {title} key(s): " + ", ".join(shown))
        parts.append("  (is the config.json the one these weights were trained with?)")
        raise CheckpointError("\n".join(parts))

    put = put or (lambda path, x: jax.device_put(x))
    flat = {}
    for path, (key, transform, leaf) in tqdm(table.items(), desc=f"converting {type(module).__name__}",
                                             unit="tensor", disable=(not progress) if progress is not None else None,
                                             leave=False):
        x = np.asarray(transform.to_flax(reader.get(key)))
        flat[path] = put(path, x.astype(param_dtype or leaf.dtype))
    return unflatten(flat)


def export_state(module, params) -> dict[str, np.ndarray]:
    """Flax params -> reference state dict (numpy, reference names and layouts)."""
    table = _key_table(module)
    flat = flatten(params)
    if set(flat) != set(table):
        raise ValueError(f"params do not match {type(module).__name__}: missing {sorted(set(table) - set(flat))[:10]}, "
                         f"unexpected {sorted(set(flat) - set(table))[:10]}")
    out = {}
    for path, (key, transform, _) in table.items():
        out[key] = np.ascontiguousarray(transform.to_torch(np.asarray(jax.device_get(flat[path]))))
    return out


class _DictReader:
    def __init__(self, d):
        self.d = d

    def keys(self):
        return list(self.d)

    def shape(self, key):
        return tuple(np.shape(self.d[key]))

    def get(self, key):
        x = self.d[key]
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().float().numpy()
        return np.asarray(x)


def load_component(path_or_hub_id: str | os.PathLike, name: str, *, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32, variant: str | None = None, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, put: Callable[[str, np.ndarray], jax.Array] | None = None, progress: bool | None = None):
    """Loads one component of a diffusers unCLIP pipeline (or a single component folder).

    name: prior, text_proj, decoder, super_res_first, super_res_last, text_encoder or image_encoder.
    path_or_hub_id: a local folder or a Hugging Face hub id ("kakaobrain/karlo-v1-alpha"); the hub is
    reached through huggingface_hub and its cache (HF_HUB_OFFLINE=1 reads the cache only).
    cache_dir: the huggingface_hub cache to use instead of the default one.
    variant: e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
    put(path, array): places each converted tensor (e.g. `jax.device_put` with a sharding) as it is
    made, so the full parameters need never sit on one device.
    Returns (module, params) with `module.apply({"params": params}, ...)` ready to call.
    """
    root = resolve_folder(path_or_hub_id, name, revision=revision, cache_dir=cache_dir)
    folder = component_folder(root, name)
    config = read_config(folder)
    try:
        module = from_config(name, config, dtype=dtype, param_dtype=param_dtype)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    reader = open_weights(folder, variant)
    params = convert_state(module, reader, param_dtype=param_dtype, where=str(getattr(reader, "path", folder)),
                           put=put, progress=progress)
    return module, params


def save_component(path: str | os.PathLike, name: str, module, params, *, safe_serialization: bool = True) -> Path:
    """Writes `path/name/` (config.json + weights) in the layout diffusers' / transformers' from_pretrained read.

    Weights are saved in float32 unless the parameters are bf16/fp16, which are kept as they are.
    Returns the component folder.
    """
    from safetensors.numpy import save_file

    folder = Path(path) / name
    folder.mkdir(parents=True, exist_ok=True)
    state = export_state(module, params)
    config = module.config.to_dict()
    stem = "diffusion_pytorch_model" if "_class_name" in config else "model"
    if not safe_serialization:
        raise ValueError("unclip_jax writes safetensors only; both diffusers and transformers read them")
    tmp = folder / f".{stem}.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / f"{stem}.safetensors")  # never leave a half-written weight file behind
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
