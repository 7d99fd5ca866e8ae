"""UnCLIPPipeline and UnCLIPImageVariationPipeline: diffusers' API over the jitted functions of `sampling`.

    pipe = unclip_jax.UnCLIPPipeline.from_pretrained("kakaobrain/karlo-v1-alpha", dtype=jnp.bfloat16)
    images = pipe("a red panda eating bamboo", rng=0, num_images_per_prompt=4).images

`pipe.stages` (static modules and scheduler configs) and `pipe.params` (a dict of parameter trees by
component name) are plain attributes: swap or fine-tune any component and call again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax import sampling
from unclip_jax.convert import load_component
from unclip_jax.convert.io import CheckpointError, resolve_folder
from unclip_jax.diffusion import scheduler as sch
from unclip_jax.manipulations import ManipulationsMixin
from unclip_jax.sampling import Noise, Stages, TextConditioning, Tokens

logger = logging.getLogger(__name__)

TEXT_TO_IMAGE_COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder")
VARIATION_COMPONENTS = ("text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder", "image_encoder")
SCHEDULERS = {"prior_scheduler": sch.PRIOR, "decoder_scheduler": sch.DECODER, "super_res_scheduler": sch.SUPER_RES}


@dataclasses.dataclass
class ImagePipelineOutput:
    """images: a list of PIL images, or an array (B, H, W, 3) in [0, 1] for output_type "np" / "jax".

    timings: with profile=True, {stage: {"compile_s": ..., "run_s": ...}}.
    """
    images: Any
    timings: dict | None = None


class _StageTimer:
    """Runs jitted stage functions one at a time, timing compilation (AOT) and execution separately."""

    def __init__(self):
        self.timings: dict[str, dict[str, float]] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        """fn: jitted with the Stages as its first argument and the _STATIC names as static keywords."""
        t0 = time.perf_counter()
        compiled = fn.lower(*args, **kwargs).compile()
        t1 = time.perf_counter()
        out = jax.block_until_ready(compiled(*[a for a in args if not isinstance(a, Stages)], **{
            k: v for k, v in kwargs.items() if k not in _STATIC}))
        self.timings[name] = {"compile_s": t1 - t0, "run_s": time.perf_counter() - t1}
        return out


_STATIC = ("num_steps", "guidance")


def _decoder_stage(stages, params, image_embeddings, text, key, scale, *, num_steps, guidance, latents, step_noise):
    cond = sampling.decoder_conditioning(stages, params, image_embeddings, text, guidance=guidance)
    return sampling.sample_decoder(stages, params, cond, key, scale, num_steps=num_steps, guidance=guidance,
                                   latents=latents, step_noise=step_noise)


def _super_res_stage(stages, params, small, key, *, num_steps, latents, step_noise):
    return sampling.to_unit_range(sampling.sample_super_res(stages, params, small, key, num_steps=num_steps,
                                                            latents=latents, step_noise=step_noise))


# Stage by stage, for profile=True: the same computation as the fused functions, split where it is timed.
_encode_stage = jax.jit(sampling.encode_text, static_argnums=0)
_prior_stage = jax.jit(sampling.sample_prior, static_argnums=0, static_argnames=_STATIC)
_decoder_stage = jax.jit(_decoder_stage, static_argnums=0, static_argnames=_STATIC)
_super_res_stage = jax.jit(_super_res_stage, static_argnums=0, static_argnames=("num_steps",))


def _staged_decode(timer, stages, params, embeddings, full, k_dec, k_sr, decoder_scale, noise: Noise, *,
                   decoder_steps, super_res_steps, guidance):
    small = timer("decoder", _decoder_stage, stages, params, embeddings, full, k_dec, decoder_scale,
                  num_steps=decoder_steps, guidance=guidance, latents=noise.decoder_latents,
                  step_noise=noise.decoder_step_noise)
    return timer("super_res", _super_res_stage, stages, params, small, k_sr, num_steps=super_res_steps,
                 latents=noise.super_res_latents, step_noise=noise.super_res_step_noise)


def enable_compilation_cache(path: str | os.PathLike = "~/.cache/unclip_jax/xla") -> None:
    """Switches on JAX's persistent compilation cache: later processes skip compiling the samplers."""
    path = os.path.expanduser(str(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _load(path_or_id, names, *, dtype, param_dtype, revision=None, cache_dir=None, variant=None,
          progress: bool | None = None):
    root = resolve_folder(path_or_id, None, revision=revision, cache_dir=cache_dir)
    modules, params = {}, {}
    for name in names:
        t0 = time.perf_counter()
        modules[name], params[name] = load_component(root, name, dtype=dtype, param_dtype=param_dtype,
                                                     variant=variant, progress=progress)
        logger.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
    schedulers = {}
    for name, default in SCHEDULERS.items():
        cfg_path = root / name / "scheduler_config.json"
        schedulers[name] = (sch.SchedulerConfig.from_diffusers(json.loads(cfg_path.read_text()))
                            if cfg_path.exists() else default)
    tokenizer_dir = root / "tokenizer"
    if not tokenizer_dir.exists():
        raise CheckpointError(f"{tokenizer_dir} is missing: the pipeline needs its CLIP tokenizer (vocab.json, merges.txt)")
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    settings = read_settings(root)
    stages = Stages(**modules, **schedulers, super_res_start_timestep=settings.get("super_res_start_timestep"))
    return root, stages, params, tokenizer, settings.get("sampling_defaults", {})


SETTINGS_FILE = "unclip_jax.json"
# diffusers' UnCLIPPipeline defaults: what a sampling argument left at None becomes, unless the model's
# unclip_jax.json gives its own value (pipe.sampling_defaults).
KARLO_SETTINGS = dict(prior_num_inference_steps=25, decoder_num_inference_steps=25, super_res_num_inference_steps=7,
                      prior_guidance_scale=4.0, decoder_guidance_scale=8.0)
SAMPLING_DEFAULTS = tuple(KARLO_SETTINGS)   # the settings a model's unclip_jax.json may give


def read_settings(root: Path) -> dict:
    """The folder's optional unclip_jax.json: {"super_res_start_timestep": int, "sampling_defaults": {...}}, the
    settings a model was evaluated with (the demo model has one; Karlo's folders do not, and need none)."""
    path = Path(root) / SETTINGS_FILE
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    unknown = set(settings) - {"super_res_start_timestep", "sampling_defaults"}
    unknown |= set(settings.get("sampling_defaults", {})) - set(SAMPLING_DEFAULTS)
    if unknown:
        raise CheckpointError(f"{path}: unknown setting(s) {sorted(unknown)}; expected super_res_start_timestep and "
                              f"sampling_defaults with keys from {SAMPLING_DEFAULTS}")
    t0 = settings.get("super_res_start_timestep")
    if t0 is not None and (isinstance(t0, bool) or not isinstance(t0, int) or t0 < 0):
        raise CheckpointError(f"{path}: super_res_start_timestep={t0!r}; expected a timestep >= 0 or null")
    return settings


def _local_batch_sharding(batch: int):
    """A data-parallel sharding over the most local devices that divide the batch (None for one)."""
    devices = jax.local_devices()
    k = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
    if k == 1:
        return None
    return NamedSharding(Mesh(np.array(devices[:k]), ("data",)), PartitionSpec("data"))


def _as_rng(rng):
    if rng is None:
        rng = int.from_bytes(os.urandom(4), "little")
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def _to_output(images: jax.Array, output_type: str):
    if output_type == "jax":
        return images
    array = np.asarray(jax.device_get(images), dtype=np.float32)
    if output_type == "np":
        return array
    if output_type == "pil":
        from PIL import Image
        return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in array]
    raise ValueError(f"output_type must be 'pil', 'np' or 'jax', got {output_type!r}")


def _finish(images, output_type, return_dict, timings=None):
    images = _to_output(images, output_type)
    return ImagePipelineOutput(images, timings) if return_dict else (images,)


def _check_images_per_prompt(n) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_images_per_prompt must be a positive int, got {n!r}")


def _to_numpy(x) -> np.ndarray:
    """A numpy array, a jax array or a torch tensor -> a float32 numpy array."""
    return np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x, np.float32)


def _check_steps(**steps):
    for name, n in steps.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
            raise ValueError(f"{name} must be an int >= 2 (unCLIP's timestep spacing divides by n - 1), got {n!r}")


class _Base:
    components: tuple[str, ...] = ()

    def __init__(self, stages: Stages, params: dict, tokenizer, feature_extractor=None):
        self.stages, self.params, self.tokenizer, self.feature_extractor = stages, params, tokenizer, feature_extractor
        self.sampling_defaults: dict = {}
        self._encode = jax.jit(sampling.encode_text, static_argnums=0)

    def _settings(self, **given) -> tuple:
        """Each sampling argument as given, else the model's setting, else KARLO_SETTINGS (in the given order)."""
        return tuple(v if v is not None else self.sampling_defaults.get(k, KARLO_SETTINGS[k]) for k, v in given.items())

    # ------------------------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str]) -> Tokens:
        """Pads to the tokenizer's max length (77), truncating longer prompts with a warning, as diffusers does."""
        max_length = self.tokenizer.model_max_length
        full = self.tokenizer(list(prompts), padding="longest", truncation=False, return_tensors="np")
        if full.input_ids.shape[1] > max_length:
            removed = [self.tokenizer.decode(ids[max_length - 1:-1][m[max_length - 1:-1].astype(bool)])
                       for ids, m in zip(full.input_ids, full.attention_mask)]
            warnings.warn("The following part of your input was truncated because CLIP can only handle sequences up "
                          f"to {max_length} tokens: {[r for r in removed if r]}", stacklevel=3)
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="np")
        return Tokens(jnp.asarray(tok.input_ids, jnp.int32), jnp.asarray(tok.attention_mask.astype(bool)))

    def encode_prompt(self, prompts: Sequence[str]) -> TextConditioning:
        tokens = self.tokenize(prompts)
        return self._encode(self.stages, self.params, tokens.input_ids, tokens.attention_mask)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, variant: str | None = None,
                        progress: bool | None = None):
        """Reads a diffusers unCLIP folder or hub id: components, tokenizer and scheduler configs.

        dtype: the networks' compute dtype (jnp.bfloat16 is safe: scheduler arithmetic, softmax and
        norms stay float32); param_dtype: how the weights are stored.
        """
        root, stages, params, tokenizer, defaults = _load(path_or_hub_id, cls.components, dtype=dtype,
                                                          param_dtype=param_dtype, revision=revision,
                                                          cache_dir=cache_dir, variant=variant, progress=progress)
        extractor = None
        if "image_encoder" in cls.components:
            from transformers import CLIPImageProcessorPil
            fe = root / "feature_extractor"
            extractor = CLIPImageProcessorPil.from_pretrained(str(fe)) if fe.exists() else CLIPImageProcessorPil()
        pipe = cls(stages, params, tokenizer, extractor)
        pipe.sampling_defaults = dict(defaults)  # what the CLI uses when its flags are not given
        return pipe


class UnCLIPPipeline(ManipulationsMixin, _Base):
    """Text-to-image with unCLIP (Karlo): prior, decoder and super-resolution, one jitted function."""

    components = TEXT_TO_IMAGE_COMPONENTS

    def __init__(self, stages: Stages, params: dict, tokenizer, feature_extractor=None):
        super().__init__(stages, params, tokenizer, feature_extractor)
        self._sample = jax.jit(sampling.text_to_image, static_argnums=0, static_argnames=(
            "num_images_per_prompt", "prior_num_inference_steps", "decoder_num_inference_steps",
            "super_res_num_inference_steps", "guidance", "batch_sharding", "return_intermediates"))

    def __call__(self, prompt: str | list[str] | None = None, *, rng: Any = None, num_images_per_prompt: int = 1,
                 prior_num_inference_steps: int | None = None, decoder_num_inference_steps: int | None = None,
                 super_res_num_inference_steps: int | None = None, prior_guidance_scale: float | None = None,
                 decoder_guidance_scale: float | None = None, text_model_output=None, text_attention_mask=None,
                 prior_latents=None, decoder_latents=None, super_res_latents=None, prior_step_noise=None,
                 decoder_step_noise=None, super_res_step_noise=None, output_type: str = "pil",
                 return_dict: bool = True, profile: bool = False):
        """Generates images for a prompt or list of prompts (or for given text encoder outputs).

        text_model_output: (text_embeds (P, D), last_hidden_state (P, L, D)) or an object with those
        attributes, with text_attention_mask (P, L), instead of a prompt.
        *_latents and *_step_noise: explicit noise (see `sampling.Noise`); shapes are checked against
        (P * num_images_per_prompt, ...). rng: a jax key or an int seed (None: a fresh random seed).
        profile: run the stages as separately compiled functions (same images, one device) and
        report each one's compile and run time in the output's `timings`.
        Steps and guidance scales left at None take the model's settings (`sampling_defaults`, from its
        unclip_jax.json), else diffusers' defaults (KARLO_SETTINGS: 25 / 25 / 7 steps, guidance 4 and 8).
        """
        prior_num_inference_steps, decoder_num_inference_steps, super_res_num_inference_steps, \
            prior_guidance_scale, decoder_guidance_scale = self._settings(
                prior_num_inference_steps=prior_num_inference_steps,
                decoder_num_inference_steps=decoder_num_inference_steps,
                super_res_num_inference_steps=super_res_num_inference_steps,
                prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale)
        _check_steps(prior_num_inference_steps=prior_num_inference_steps,
                     decoder_num_inference_steps=decoder_num_inference_steps,
                     super_res_num_inference_steps=super_res_num_inference_steps)
        _check_images_per_prompt(num_images_per_prompt)
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
            if len(prompts) == 0:
                raise ValueError("prompt is an empty list: give at least one prompt")
            text = self.tokenize(prompts)
        elif text_model_output is not None:
            text = _text_model_output(text_model_output, text_attention_mask)
        else:
            raise ValueError("give a prompt, or text_model_output with text_attention_mask")
        batch = text.input_ids.shape[0] if isinstance(text, Tokens) else text.batch_size
        guidance = prior_guidance_scale > 1.0 or decoder_guidance_scale > 1.0
        uncond = self.tokenize([""]) if guidance else None
        noise = _noise(self.stages, batch * num_images_per_prompt, prior_latents=prior_latents,
                       prior_step_noise=prior_step_noise, decoder_latents=decoder_latents,
                       decoder_step_noise=decoder_step_noise, super_res_latents=super_res_latents,
                       super_res_step_noise=super_res_step_noise, steps=(prior_num_inference_steps,
                       decoder_num_inference_steps, super_res_num_inference_steps))
        if profile:
            timer = _StageTimer()
            encode = lambda tokens, name: timer(name, _encode_stage, self.stages, self.params, tokens.input_ids,
                                                tokens.attention_mask)
            cond = encode(text, "text_encoder") if isinstance(text, Tokens) else text
            cond = sampling._repeat(cond, num_images_per_prompt)
            full = sampling._with_uncond(cond, encode(uncond, "text_encoder_uncond")) if guidance else cond
            k_prior, k_dec, k_sr = jax.random.split(_as_rng(rng), 3)
            noise = noise or Noise()
            embeddings = timer("prior", _prior_stage, self.stages, self.params, full, k_prior,
                               jnp.float32(prior_guidance_scale), num_steps=prior_num_inference_steps,
                               guidance=guidance, latents=noise.prior_latents, step_noise=noise.prior_step_noise)
            images = _staged_decode(timer, self.stages, self.params, embeddings, full, k_dec, k_sr,
                                    jnp.float32(decoder_guidance_scale), noise, guidance=guidance,
                                    decoder_steps=decoder_num_inference_steps,
                                    super_res_steps=super_res_num_inference_steps)
            return _finish(images, output_type, return_dict, timer.timings)
        images = self._sample(self.stages, self.params, text, uncond, _as_rng(rng),
                              jnp.float32(prior_guidance_scale), jnp.float32(decoder_guidance_scale),
                              num_images_per_prompt=num_images_per_prompt,
                              prior_num_inference_steps=prior_num_inference_steps,
                              decoder_num_inference_steps=decoder_num_inference_steps,
                              super_res_num_inference_steps=super_res_num_inference_steps, guidance=guidance,
                              noise=noise, batch_sharding=_local_batch_sharding(batch * num_images_per_prompt))
        return _finish(images, output_type, return_dict)


class UnCLIPImageVariationPipeline(ManipulationsMixin, _Base):
    """Variations of an image: its CLIP image embedding decoded with the empty prompt (Karlo)."""

    components = VARIATION_COMPONENTS

    def __init__(self, stages: Stages, params: dict, tokenizer, feature_extractor=None):
        super().__init__(stages, params, tokenizer, feature_extractor)
        self._vary = jax.jit(sampling.image_variation, static_argnums=0, static_argnames=(
            "num_images_per_prompt", "decoder_num_inference_steps", "super_res_num_inference_steps", "guidance",
            "batch_sharding"))
        self._embed = jax.jit(lambda stages, params, pixels: stages.image_encoder.apply(
            {"params": params["image_encoder"]}, pixels).image_embeds.astype(jnp.float32), static_argnums=0)

    def preprocess(self, image) -> jax.Array:
        """PIL image(s) or array(s) -> CLIP pixel values (B, 224, 224, 3), exactly as CLIPImageProcessor.

        Arrays: (H, W), (H, W, C) or (B, H, W, C), uint8 in [0, 255] or float in [0, 1]; C is 1 (grayscale),
        3 (RGB) or 4 (RGBA, alpha dropped).
        """
        from transformers import CLIPImageProcessorPil
        extractor = self.feature_extractor or CLIPImageProcessorPil()
        pixels = extractor(images=to_pil_list(image), return_tensors="np").pixel_values  # (B, 3, H, W)
        return jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32)

    def embed_images(self, image) -> jax.Array:
        """Images -> CLIP image embeddings (B, D) through the vision tower."""
        return self._embed(self.stages, self.params, self.preprocess(image))

    def __call__(self, image=None, *, rng: Any = None, num_images_per_prompt: int = 1,
                 decoder_num_inference_steps: int | None = None, super_res_num_inference_steps: int | None = None,
                 decoder_guidance_scale: float | None = None, image_embeddings=None, decoder_latents=None,
                 super_res_latents=None, decoder_step_noise=None, super_res_step_noise=None,
                 output_type: str = "pil", return_dict: bool = True, profile: bool = False):
        """Variations of `image` (PIL image, list, or array; see `preprocess`) or of given image_embeddings (B, D).

        profile: as for UnCLIPPipeline, per-stage compile and run times in the output's `timings`.
        Settings left at None: the model's, else diffusers' defaults (as for UnCLIPPipeline).
        """
        decoder_num_inference_steps, super_res_num_inference_steps, decoder_guidance_scale = self._settings(
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, decoder_guidance_scale=decoder_guidance_scale)
        timer = _StageTimer() if profile else None
        _check_steps(decoder_num_inference_steps=decoder_num_inference_steps,
                     super_res_num_inference_steps=super_res_num_inference_steps)
        _check_images_per_prompt(num_images_per_prompt)
        if image_embeddings is None:
            if image is None:
                raise ValueError("give an image (or images), or image_embeddings")
            pixels = self.preprocess(image)
            image_embeddings = (timer("image_encoder", self._embed, self.stages, self.params, pixels) if profile
                                else self._embed(self.stages, self.params, pixels))
        image_embeddings = jnp.asarray(np.asarray(image_embeddings), jnp.float32)
        dim = self.stages.text_proj.config.clip_embeddings_dim
        if image_embeddings.ndim != 2 or image_embeddings.shape[1] != dim:
            raise ValueError(f"image_embeddings has shape {tuple(image_embeddings.shape)}; expected (batch, {dim})")
        batch = image_embeddings.shape[0]
        guidance = decoder_guidance_scale > 1.0
        empty = self.tokenize([""])
        noise = _noise(self.stages, batch * num_images_per_prompt, decoder_latents=decoder_latents,
                       decoder_step_noise=decoder_step_noise, super_res_latents=super_res_latents,
                       super_res_step_noise=super_res_step_noise,
                       steps=(None, decoder_num_inference_steps, super_res_num_inference_steps))
        if profile:
            cond = timer("text_encoder", _encode_stage, self.stages, self.params, empty.input_ids, empty.attention_mask)
            b = batch * num_images_per_prompt
            cond = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:]), cond)
            full = sampling._with_uncond(cond, cond) if guidance else cond
            _, k_dec, k_sr = jax.random.split(_as_rng(rng), 3)
            embeddings = jnp.repeat(image_embeddings, num_images_per_prompt, axis=0)
            images = _staged_decode(timer, self.stages, self.params, embeddings, full, k_dec, k_sr,
                                    jnp.float32(decoder_guidance_scale), noise or Noise(), guidance=guidance,
                                    decoder_steps=decoder_num_inference_steps,
                                    super_res_steps=super_res_num_inference_steps)
            return _finish(images, output_type, return_dict, timer.timings)
        images = self._vary(self.stages, self.params, image_embeddings, empty, empty if guidance else None,
                            _as_rng(rng), jnp.float32(decoder_guidance_scale),
                            num_images_per_prompt=num_images_per_prompt,
                            decoder_num_inference_steps=decoder_num_inference_steps,
                            super_res_num_inference_steps=super_res_num_inference_steps, guidance=guidance,
                            noise=noise, batch_sharding=_local_batch_sharding(batch * num_images_per_prompt))
        return _finish(images, output_type, return_dict)


def to_pil_list(image) -> list:
    """PIL image, list of them, or arrays ((H, W), (H, W, C), (B, H, W, C); C in 1, 3, 4) -> list of RGB PIL images."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return [image.convert("RGB")]
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list: give at least one image")
        return [im for x in image for im in to_pil_list(x)]
    a = np.asarray(image)
    if a.ndim == 4:
        return [im for x in a for im in to_pil_list(x)]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image has shape {a.shape}, which looks channels-first; expected (H, W, C) with C in 1, 3, 4")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image has shape {a.shape}; expected (H, W), (H, W, C) or (B, H, W, C) with C in 1, 3, 4")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1]]
    return [Image.fromarray(a[..., 0] if mode == "L" else a, mode).convert("RGB")]


def _text_model_output(text_model_output, text_attention_mask) -> TextConditioning:
    if text_attention_mask is None:
        raise ValueError("text_model_output needs text_attention_mask (B, L), as from the tokenizer")
    if hasattr(text_model_output, "text_embeds"):
        embeds, hidden = text_model_output.text_embeds, text_model_output.last_hidden_state
    else:
        embeds, hidden = text_model_output[0], text_model_output[1]
    embeds, hidden, mask = _to_numpy(embeds), _to_numpy(hidden), _to_numpy(text_attention_mask)
    if embeds.ndim != 2 or hidden.ndim != 3 or hidden.shape[0] != embeds.shape[0] or mask.shape != hidden.shape[:2]:
        raise ValueError(f"text_model_output has text_embeds {embeds.shape}, last_hidden_state {hidden.shape} and "
                         f"text_attention_mask {mask.shape}; expected (B, D), (B, L, D) and (B, L)")
    return TextConditioning(jnp.asarray(embeds, jnp.float32), jnp.asarray(hidden, jnp.float32), jnp.asarray(mask, bool))


def _noise(stages: Stages, batch: int, *, steps, **given) -> Noise | None:
    """Checks explicit noise against the shapes the stages will use; NCHW is rejected, not transposed."""
    shapes = {}
    if stages.prior is not None:
        shapes["prior"] = (batch, stages.prior.config.embedding_dim)
    dec = stages.decoder.config
    shapes["decoder"] = (batch, dec.sample_size, dec.sample_size, dec.in_channels)
    sr = stages.super_res_first.config
    shapes["super_res"] = (batch, sr.sample_size, sr.sample_size, sr.in_channels // 2)
    n_steps = dict(zip(("prior", "decoder", "super_res"), steps))
    out = {}
    for key, value in given.items():
        if value is None:
            continue
        stage = key.rsplit("_", 2)[0] if key.endswith("_step_noise") else key[: -len("_latents")]
        expected = shapes[stage] if key.endswith("_latents") else (n_steps[stage],) + shapes[stage]
        meaning = ("(batch * images per prompt, " + ("embedding_dim)" if stage == "prior" else "size, size, channels) NHWC")
                   if key.endswith("_latents") else "(num_inference_steps, batch * images per prompt, ...)")
        value = _to_numpy(value)
        if value.shape != expected:
            raise ValueError(f"{key} has shape {value.shape}; expected {expected} = {meaning}")
        out[key] = jnp.asarray(value)
    return Noise(**out) if out else None
