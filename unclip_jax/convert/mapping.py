"""Parameter names and layouts between unclip_jax (Flax, NHWC) and the PyTorch reference.

Conversion is data: a flax parameter path becomes a reference key through

1. list indices: `down_blocks_0/resnets_1` -> `down_blocks.0.resnets.1` for the names in LIST_NAMES
   (the reference's nn.ModuleList / nn.Sequential attributes), and
2. the first matching rule of (flax path regex, reference key template, transform); a model adds its
   own rules in front of the defaults through its `CHECKPOINT_RULES` class attribute.

A transform is a named pair of functions (reference -> flax, flax -> reference) on numpy arrays.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _kernel_to_flax(w: np.ndarray) -> np.ndarray:
    if w.ndim == 2:   # Linear (out, in) -> Dense (in, out)
        return w.T
    if w.ndim == 4:   # Conv2d (out, in, h, w) -> Conv (h, w, in, out)
        return w.transpose(2, 3, 1, 0)
    raise ValueError(f"cannot convert a kernel of rank {w.ndim}")


def _kernel_to_torch(w: np.ndarray) -> np.ndarray:
    if w.ndim == 2:
        return w.T
    if w.ndim == 4:
        return w.transpose(3, 2, 0, 1)
    raise ValueError(f"cannot convert a kernel of rank {w.ndim}")


IDENTITY = Transform("identity", lambda w: w, lambda w: w)
KERNEL = Transform("kernel", _kernel_to_flax, _kernel_to_torch)

# nn.ModuleList / nn.Sequential attributes of the reference models; Flax names their items `<name>_<i>`.
LIST_NAMES = ("layers", "transformer_blocks", "down_blocks", "up_blocks", "resnets", "attentions",
              "downsamplers", "upsamplers", "to_out", "net")
_LIST_RE = re.compile(r"(?:(?<=/)|^)(" + "|".join(LIST_NAMES) + r")_(\d+)(?=/|$)")

Rule = tuple[str, str, Transform]

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"^(.*)/kernel$", r"\1/weight", KERNEL),
    (r"^(.*)/scale$", r"\1/weight", IDENTITY),        # LayerNorm, GroupNorm
    (r"^(.*)/embedding$", r"\1/weight", IDENTITY),    # nn.Embed
    (r"^(.*)$", r"\1", IDENTITY),                     # biases and free parameters keep their names
)


def flax_path_to_key(path: str, rules: tuple[Rule, ...] = ()) -> tuple[str, Transform]:
    """'down_blocks_0/resnets_1/conv1/kernel' -> ('down_blocks.0.resnets.1.conv1.weight', KERNEL)."""
    path = _LIST_RE.sub(r"\1.\2", path)
    for pattern, template, transform in tuple(rules) + DEFAULT_RULES:
        if re.match(pattern, path):
            return re.sub(pattern, template, path).replace("/", "."), transform
    raise AssertionError("the last default rule matches everything")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            out.update(flatten(dict(v), key))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
