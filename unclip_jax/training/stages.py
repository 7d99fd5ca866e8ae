"""What differs between unCLIP's stages: which modules train, where they come from, what the loss sees.

    stage = build_stage(config)             # modules from config.model or from config.init_from's configs
    loss, parts = stage.loss(params, batch, key, frozen)
    stage.export(ema_params, "out/")        # diffusers layout, one folder per component (save_component)

Trained components: clip -> {text_encoder, image_encoder} plus a learned temperature (logit_scale, not
exported); prior -> {prior}; decoder -> {decoder, text_proj} (text_proj learns with the decoder,
paper 2.1); upsampler / upsampler_1024 -> {config.component}. The CLIP text tower is frozen (paper, Figure 2)
and lives outside the trained parameters, in `frozen` with the empty prompt's encoding used for text dropout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.convert import load_component, save_component
from unclip_jax.convert.io import component_folder, read_config, resolve_folder
from unclip_jax.diffusion import scheduler as sch
from unclip_jax.models import abstract_params, from_config, init_params
from unclip_jax.sampling import TextConditioning
from unclip_jax.training import losses, sharding
from unclip_jax.training.losses import LossConfig

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def trained_components(config) -> tuple[str, ...]:
    return {"clip": ("text_encoder", "image_encoder"), "prior": ("prior",),
            "decoder": ("decoder", "text_proj")}.get(config.stage, (config.component,))


def _model_key(name: str) -> str:
    """unclip_jax.models' component key for a module name (a new upsampler name is a super_res UNet)."""
    return "super_res_first" if name.startswith("super_res") else name


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """The static half of training one stage (jit closes over it)."""
    name: str
    modules: dict            # component -> flax module (trained)
    text_encoder: Any        # frozen CLIP text tower (flax module) or None
    scheduler: sch.SchedulerConfig
    loss_config: LossConfig
    remat_prior: bool = False
    export_extra: Callable[[Path], list] | None = None   # clip: writes tokenizer/ and feature_extractor/
    logit_scale_init: float = 2.6592

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.modules)

    def extra_params(self) -> dict:
        """Trained arrays outside the components: the clip stage's temperature."""
        return {"logit_scale": np.float32(self.logit_scale_init)} if self.name == "clip" else {}

    def abstract(self):
        """({component: shapes}, {component: logical PartitionSpecs}) without allocating."""
        out = {name: abstract_params(m) for name, m in self.modules.items()}
        shapes, logical = {n: s for n, (s, _) in out.items()}, {n: a for n, (_, a) in out.items()}
        for k, v in self.extra_params().items():
            shapes[k] = jax.ShapeDtypeStruct(np.shape(v), jnp.float32)
            logical[k] = jax.sharding.PartitionSpec()
        return shapes, logical

    # ----------------------------------------------------------------------------------------- loss

    def text(self, batch: dict, frozen: dict) -> TextConditioning:
        """The batch's text conditioning; hidden states from the frozen tower when the batch has none."""
        mask = batch["attention_mask"].astype(bool)
        if "text_hidden_states" in batch:
            hidden = batch["text_hidden_states"].astype(jnp.float32)
        else:
            if self.text_encoder is None or "text_encoder" not in (frozen or {}):
                raise ValueError("the batch has no text_hidden_states and no frozen text encoder is configured: set "
                                 "config.text_encoder (a diffusers folder / hub id) or config.model.text_encoder")
            out = self.text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"], mask)
            hidden = jax.lax.stop_gradient(out.last_hidden_state.astype(jnp.float32))
        return TextConditioning(batch["text_embeds"].astype(jnp.float32), hidden, mask)

    def loss(self, params: dict, batch: dict, key: jax.Array, frozen: dict):
        if self.name == "clip":
            return losses.clip_loss(self.modules["text_encoder"], self.modules["image_encoder"], params, batch)
        sched = sch.create_state(self.scheduler)
        cfg = self.loss_config
        if self.name == "prior":
            null = TextConditioning(**frozen["null_text"])
            fn = lambda p: losses.prior_loss(self.modules["prior"], p, self.text(batch, frozen), batch["image_embeds"],
                                             key, sched=sched, cfg=cfg, null_text=null)
            if self.remat_prior:  # keep matmul outputs, recompute the rest in the backward pass
                fn = jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots)
            return fn(params["prior"])
        if self.name == "decoder":
            null = TextConditioning(**frozen["null_text"])
            return losses.decoder_loss(self.modules["decoder"], self.modules["text_proj"], params, batch["image"],
                                       batch["image_embeds"], self.text(batch, frozen), key, sched=sched, cfg=cfg,
                                       null_text=null)
        (name,) = self.components
        return losses.upsampler_loss(self.modules[name], params[name], batch["image"], batch.get("low_res"), key,
                                     sched=sched, cfg=cfg)

    # --------------------------------------------------------------------------------------- export

    def export(self, params: dict, path) -> list:
        """Writes each trained component (EMA weights) in the diffusers layout under `path` (host 0 only)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return []
        paths = [save_component(path, name, m, params[name]) for name, m in self.modules.items()]
        if self.export_extra is not None:
            paths += self.export_extra(Path(path))
        return paths


def build_stage(config) -> Stage:
    """Modules for config.stage: architecture from config.init_from's config.json when set, else config.model."""
    dtype = DTYPES[config.compute_dtype]
    modules = {}
    for name in trained_components(config):
        if config.init_from:
            folder = component_folder(resolve_folder(config.init_from, name), name)
            model_cfg = read_config(folder)
        elif name in config.model:
            entry = config.model[name]
            model_cfg = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
        else:
            raise ValueError(f"config.model has no {name!r} entry (a diffusers config dict) and config.init_from is "
                             f"not set: nothing says what the {name} looks like")
        if config.dropout is not None and (name in ("prior", "decoder") or name.startswith("super_res")):
            model_cfg = {**model_cfg, "dropout": float(config.dropout)}
        module = from_config(_model_key(name), model_cfg, dtype=dtype, param_dtype=jnp.float32)
        if hasattr(module, "remat") and config.remat:
            module = module.clone(remat=True)
        modules[name] = module

    text_encoder = None
    if config.stage in ("prior", "decoder"):
        if config.text_encoder:
            te_cfg = read_config(component_folder(resolve_folder(config.text_encoder, "text_encoder"), "text_encoder"))
            text_encoder = from_config("text_encoder", te_cfg, dtype=dtype)
        elif "text_encoder" in config.model:
            text_encoder = from_config("text_encoder", config.model.text_encoder.to_dict(), dtype=dtype)

    base = {"prior": sch.PRIOR, "decoder": sch.DECODER}.get(config.stage, sch.SUPER_RES)
    scheduler = dataclasses.replace(base, num_train_timesteps=int(config.num_train_timesteps))
    if config.stage == "decoder":
        scheduler = dataclasses.replace(scheduler, prediction_type=config.prediction_type)
    extra = None
    if config.stage == "clip":
        extra = lambda path: export_clip_extras(path, config.tokenizer, modules["image_encoder"].config.image_size)
    elif config.stage == "decoder":   # the sampler must know what the model predicts
        extra = lambda path: [write_scheduler(Path(path) / "decoder_scheduler", scheduler)]
    return Stage(config.stage, modules, text_encoder, scheduler, LossConfig.from_config(config),
                 remat_prior=bool(config.remat) and config.stage == "prior", export_extra=extra,
                 logit_scale_init=float(config.logit_scale_init))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's pixel statistics (CLIPImageProcessor's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def write_scheduler(folder: Path, config: sch.SchedulerConfig) -> Path:
    """folder/scheduler_config.json: diffusers' UnCLIPScheduler with `config`'s settings."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scheduler_config.json"
    d = {"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.35.0", **config.to_diffusers()}
    path.write_text(json.dumps(d, indent=2) + "\n")
    return path


def export_clip_extras(path: Path, tokenizer: str | None, image_size: int) -> list:
    """Next to the exported towers: tokenizer/ (a copy of the one the stage trained with) and
    feature_extractor/ (a CLIPImageProcessor resizing to the image tower's size), so the folder is a complete
    CLIP for `unclip-jax data embed` and the pipelines."""
    import shutil

    from transformers import CLIPImageProcessor
    out = []
    if tokenizer:
        src = resolve_folder(tokenizer, "tokenizer")
        src = src / "tokenizer" if (src / "tokenizer").is_dir() else src
        shutil.copytree(src, path / "tokenizer", dirs_exist_ok=True)
        out.append(path / "tokenizer")
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(path / "feature_extractor")
    out.append(path / "feature_extractor")
    return out


# ------------------------------------------------------------------------------------------ parameters


def init_trained(stage: Stage, key: jax.Array) -> dict:
    """Random parameters of the trained components. Call it under jit(out_shardings=...) (the trainer does):
    each device then only ever materialises its own shards."""
    params = {name: init_params(m, jax.random.fold_in(key, i)) for i, (name, m) in enumerate(stage.modules.items())}
    return {**params, **{k: jnp.asarray(v) for k, v in stage.extra_params().items()}}


def load_trained(stage: Stage, source: str, shardings: dict) -> dict:
    """Pretrained parameters from a diffusers folder / hub id, each tensor placed in its sharding as read."""
    from unclip_jax.convert.mapping import flatten
    params = {}
    for name in stage.components:
        flat = flatten(shardings[name])
        _, p = load_component(source, name, param_dtype=jnp.float32,
                              put=lambda path, x: jax.device_put(x, flat[path]))
        params[name] = p
    for k, v in stage.extra_params().items():
        params[k] = jax.device_put(jnp.asarray(v), shardings[k])
    return params


def estimate_clip_stats(config, make_source) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the CLIP image embeddings over config.clip_stats_batches batches of a
    fresh source (averaged over hosts): the prior's clip_mean / clip_std when it starts from scratch."""
    source = make_source(config, config.stage)
    x = np.concatenate([np.asarray(next(source)["image_embeds"], np.float64)
                        for _ in range(config.clip_stats_batches)])
    if hasattr(source, "close"):
        source.close()
    moments = np.stack([x.mean(0), (x ** 2).mean(0)])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        moments = np.asarray(multihost_utils.process_allgather(moments)).mean(0)
    mean, var = moments[0], moments[1] - moments[0] ** 2
    return mean[None].astype(np.float32), np.sqrt(np.maximum(var, 1e-12))[None].astype(np.float32)


def empty_prompt_ids(config, source: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask (1, L) of the empty prompt "", with the tokenizer when the source has one."""
    L = config.text_length
    if source:
        try:
            from transformers import CLIPTokenizer
            tok = CLIPTokenizer.from_pretrained(str(resolve_folder(source, "tokenizer") / "tokenizer"))
            enc = tok([""], padding="max_length", max_length=L, truncation=True, return_tensors="np")
            return enc.input_ids.astype(np.int32), enc.attention_mask.astype(bool)
        except Exception as e:  # noqa: BLE001 - fall back to CLIP's layout, and say so
            log.warning("no tokenizer for the empty prompt in %s (%s); using [bos, eos, pad...]", source, e)
    ids = np.zeros((1, L), np.int32)
    ids[0, :2] = (config.vocab_size - 2, config.vocab_size - 1)   # CLIP: <|startoftext|> <|endoftext|>
    return ids, np.arange(L)[None] < 2


def init_frozen(stage: Stage, config, key: jax.Array, mesh) -> dict:
    """The frozen part: the CLIP text tower's params (loaded, or random for synthetic runs) and the empty
    prompt's encoding {embeds (D,), hidden_states (L, Dt), mask (L,)} that text dropout substitutes."""
    if stage.name not in ("prior", "decoder"):   # clip trains both towers; upsamplers see no text
        return {}
    frozen = {}
    te = stage.text_encoder
    if te is not None:
        shapes, logical = abstract_params(te)
        sh = sharding.param_shardings(logical, shapes, mesh, config.sharding_rules)
        if config.text_encoder:
            from unclip_jax.convert.mapping import flatten
            flat = flatten(sh)
            _, frozen["text_encoder"] = load_component(config.text_encoder, "text_encoder", param_dtype=jnp.float32,
                                                       put=lambda path, x: jax.device_put(x, flat[path]))
        else:
            frozen["text_encoder"] = jax.jit(lambda k: init_params(te, k), out_shardings=sh)(key)
        ids, mask = empty_prompt_ids(config, config.text_encoder)
        out = jax.jit(lambda p: te.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)))(frozen["text_encoder"])
        null = {"embeds": out.text_embeds[0], "hidden_states": out.last_hidden_state[0], "mask": jnp.asarray(mask[0])}
    else:
        log.warning("no text encoder configured: text dropout substitutes zeros for the empty prompt's encoding")
        mask = np.arange(config.text_length) < 2
        null = {"embeds": jnp.zeros((config.clip_dim,)),
                "hidden_states": jnp.zeros((config.text_length, config.text_hidden_dim)), "mask": jnp.asarray(mask)}
    null = jax.tree.map(lambda x: np.asarray(x, np.float32) if x.dtype != bool else np.asarray(x), null)
    frozen["null_text"] = jax.device_put(null, sharding.replicated(mesh))
    return frozen
