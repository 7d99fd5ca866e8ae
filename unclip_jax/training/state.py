"""The train state, the optimiser and the EMA.

    TrainState(step, params, opt_state, ema_params, rng[, frozen])

params are float32 master weights by component name ({"decoder": ..., "text_proj": ...}); the models compute
in config.compute_dtype. rng holds the raw data of the run's base key: the key of step n is
fold_in(key, n), so a resumed run draws exactly the numbers an uninterrupted one would.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from unclip_jax.convert.mapping import flatten, unflatten

# Parameters that are statistics, not weights: never updated (nor decayed) by the optimiser.
FROZEN_PARAMS = (r"(^|.*/)clip_(mean|std)$",)


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # () int32, optimiser steps taken
    params: Any                # {component: params}, float32
    opt_state: Any
    ema_params: Any            # exponential moving average of params (what gets exported)
    rng: jax.Array             # jax.random.key_data of the base key
    frozen: Any = None         # with config.frozen_in_state: the frozen text tower and empty-prompt encoding

    def key(self) -> jax.Array:
        """This step's typed key."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

    def checkpointed(self) -> dict:
        """What a checkpoint holds (the frozen part is rebuilt from its source, never saved)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "ema_params": self.ema_params, "rng": self.rng}


def learning_rate_schedule(config) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up from learning_rate / warmup_steps (step 0 already learns), then cosine, linear or no
    decay to learning_rate * min_lr_ratio at total_steps."""
    base, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    kind, floor = config.lr_schedule, config.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = base * (jnp.minimum(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        if kind == "constant":  # total_steps stays out of the program: runs of any length compile the same
            return lr
        progress = jnp.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
        if kind == "cosine":
            return lr * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(math.pi * progress)))
        return lr * (1 - (1 - floor) * progress)
    return schedule


def _labels(params, fn):
    return unflatten({path: fn(path, leaf) for path, leaf in flatten(params).items()})


def make_optimizer(config) -> optax.GradientTransformation:
    """Gradient clipping then AdamW (weight decay on kernels only); FROZEN_PARAMS get no update at all."""
    frozen = [re.compile(p) for p in FROZEN_PARAMS]
    tx = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                     weight_decay=config.weight_decay,
                     mask=lambda p: _labels(p, lambda path, _: path.endswith("kernel")))
    if config.grad_clip and config.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda p: _labels(p, lambda path, _: "frozen" if any(r.match(path) for r in frozen) else "train"))


def ema_update(ema, params, step, decay: float):
    """ema <- d ema + (1 - d) params, d = min(decay, (1 + step) / (10 + step)): early averages forget the
    random initialisation quickly. decay = 0 tracks params exactly."""
    if decay <= 0:
        return jax.tree.map(lambda p: p.astype(jnp.float32), params)
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: e + (1 - d) * (p.astype(jnp.float32) - e), ema, params)


def count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
