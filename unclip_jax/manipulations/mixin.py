"""`ManipulationsMixin`: the paper's image manipulations as methods of both pipelines.

    pipe = unclip_jax.UnCLIPImageVariationPipeline.from_pretrained("kakaobrain/karlo-v1-alpha-image-variations")
    latent = pipe.invert(cat)                                   # (z_i, x_T), section 3
    pipe.reconstruct(latent).images                             # DDIM eta = 0: the input again
    pipe.vary_ddim(latent, eta=[0.0, 0.5, 1.0], num_images_per_eta=3).images    # figure 3
    pipe.interpolate(cat, dog, num_images=7).images             # figure 4 (x_T fixed for the row)
    pipe.text_diff(cat, "an anime drawing of a super saiyan cat", base="a photo of a cat").images  # figure 5
    pipe.inpaint(cat, mask).images                              # RePaint in the decoder, then super-res

    t2i = unclip_jax.UnCLIPPipeline.from_pretrained("kakaobrain/karlo-v1-alpha")
    t2i.sample_best_of_n("a corgi", n=2).images                 # section 2.2's best-of-2 prior
    t2i.interpolate("a photo of a cat", "a photo of a dog").images
    t2i.with_component("image_encoder", "kakaobrain/karlo-v1-alpha-image-variations")  # now it can invert too

What each needs: images in -> the image_encoder (or pass image_embeddings); prompts to images -> the
prior; everything -> text_encoder, text_proj, decoder and the super-res pair. A missing component
is named in the error, with the ways to get it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.manipulations import ddim, edits
from unclip_jax.manipulations.ddim import DEFAULT_INVERSION_STEPS, DEFAULT_MAX_TIMESTEP, BipartiteLatent

_ROW_STATIC = ("num_steps", "max_timestep", "guidance", "clip_sample", "super_res_num_steps")
_invert = jax.jit(ddim.ddim_invert, static_argnums=0, static_argnames=("num_steps", "max_timestep", "guidance"))
_decode = jax.jit(ddim.decode, static_argnums=0, static_argnames=_ROW_STATIC)
# Every row (reconstruction, variations, interpolation, text diff) decodes through `_decode`: one compiled
# program per row length and static setting serves all of them; the cheap per-manipulation math runs apart.
_interpolation_rows = jax.jit(edits.interpolation_rows, static_argnums=0)
_prompt_rows = jax.jit(edits.prompt_interpolation_rows, static_argnums=0, static_argnames=("prior_num_steps",
                                                                                          "guidance"))
_text_diff_rows = jax.jit(edits.text_diff_rows)
_best_of_n = jax.jit(edits.text_to_image_best_of_n, static_argnums=0, static_argnames=(
    "n", "num_images_per_prompt", "prior_num_inference_steps", "decoder_num_inference_steps",
    "super_res_num_inference_steps", "guidance"))
_best_of_n_prior = jax.jit(edits.best_of_n_prior, static_argnums=0, static_argnames=("n", "num_steps", "guidance"))
_inpaint = jax.jit(edits.inpaint, static_argnums=0, static_argnames=("num_steps", "resample", "guidance",
                                                                     "super_res_num_steps"))
_embed = jax.jit(lambda stages, params, pixels: stages.image_encoder.apply(
    {"params": params["image_encoder"]}, pixels).image_embeds.astype(jnp.float32), static_argnums=0)

_HOW_TO_GET = {
    "image_encoder": "load the pipeline with UnCLIPImageVariationPipeline, attach one with "
                     "pipe.with_component('image_encoder', path) (e.g. kakaobrain/karlo-v1-alpha-image-variations)",
    "prior": "load the pipeline with UnCLIPPipeline, or attach one with pipe.with_component('prior', path) "
             "(e.g. kakaobrain/karlo-v1-alpha)",
}


@dataclasses.dataclass
class ManipulationOutput:
    """images: PIL images, or (N, S', S', 3) in [0, 1] for output_type "np" / "jax", in row order.

    decoder_output: (N, S, S, 3) in [0, 1], the 64x64 decoder stage before super-res (None for
    sample_best_of_n, which runs the text-to-image sampler).
    image_embeddings: (N, D), the z_i each image was decoded from. thetas: (N,) the interpolation or
    text-diff position of each image; scores: best-of-N's (N, n) similarities; latent: the inverted
    BipartiteLatent (reuse it to skip the inversion next time).
    """
    images: Any
    decoder_output: np.ndarray | None
    image_embeddings: np.ndarray | None = None
    thetas: np.ndarray | None = None
    scores: np.ndarray | None = None
    latent: BipartiteLatent | None = None


# --------------------------------------------------------------------------------------------- inputs


def _pil_list(image) -> list:
    from unclip_jax.pipeline import to_pil_list
    return to_pil_list(image)


def _square(pil, size: int, resample):
    """Centre crop to a square, then resize to size x size (CLIP's crop, so z_i sees the same pixels)."""
    w, h = pil.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return pil.crop((left, top, left + s, top + s)).resize((size, size), resample)


def decoder_pixels(image, size: int) -> jax.Array:
    """Images (PIL, arrays; see `pipeline.to_pil_list`) -> (B, size, size, 3) in [-1, 1]: centre crop to
    a square, antialiased bicubic resize."""
    from PIL import Image
    pics = [_square(p, size, Image.BICUBIC) for p in _pil_list(image)]
    return jnp.asarray(np.stack([np.asarray(p, np.float32) / 127.5 - 1.0 for p in pics]))


def binary_mask(mask, name: str = "mask") -> np.ndarray:
    """A PIL image or array (H, W) / (H, W, 1) -> bool (H, W), True where the image is regenerated.

    Accepted: bool, {0, 1} (any dtype) or {0, 255} (8-bit images, as painted masks are saved).
    """
    from PIL import Image
    a = np.asarray(mask.convert("L")) if isinstance(mask, Image.Image) else np.asarray(mask)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{name} has shape {a.shape}; expected (H, W) or (H, W, 1), the image's height and width")
    if a.dtype == bool:
        return a
    values = set(np.unique(a).tolist())
    if values <= {0, 1}:
        return a == 1
    if a.dtype == np.uint8 and values <= {0, 255}:
        return a == 255
    shown = sorted(values)[:6]
    raise ValueError(f"{name} must be binary (True/False, 0/1, or 0/255 for 8-bit images), found the values "
                     f"{shown}{' ...' if len(values) > 6 else ''}; threshold it first, e.g. mask > 127")


def _mask_pixels(mask: np.ndarray, size: int) -> jax.Array:
    """bool (H, W) -> (size, size, 1) float: cropped like the image; a pixel is regenerated where any
    input pixel it covers is (the known region never carries masked content)."""
    from PIL import Image
    pic = _square(Image.fromarray(mask.astype(np.uint8) * 255), size, Image.BOX)
    return jnp.asarray((np.asarray(pic) > 0).astype(np.float32)[..., None])


def _texts(value, batch: int, name: str) -> list[str]:
    """None, a str, or a list of B str -> a list of B str."""
    if value is None:
        return [""] * batch
    if isinstance(value, str):
        return [value] * batch
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and len(value) in (1, batch):
        return list(value) * (batch // len(value))
    raise ValueError(f"{name} must be a str or a list of {batch} str (one per image), got {value!r}")


def _thetas(num_images, thetas, top: float = 1.0) -> np.ndarray:
    if thetas is None:
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 2:
            raise ValueError(f"num_images must be an int >= 2 (a row has both ends), got {num_images!r}")
        return np.linspace(0.0, top, num_images, dtype=np.float32)
    t = np.atleast_1d(np.asarray(thetas, np.float64))
    if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > 1:
        raise ValueError(f"theta must be in [0, 1] (0 = the start, 1 = the end), got {np.asarray(thetas).tolist()}")
    return t.astype(np.float32)


def _check_theta(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r} (the paper uses 0.25 to 0.5)")
    return float(value)


def _check_eta(eta) -> np.ndarray:
    e = np.atleast_1d(np.asarray(eta, np.float64))
    if e.ndim != 1 or e.size == 0 or not np.all(np.isfinite(e)) or e.min() < 0:
        raise ValueError(f"eta must be a number >= 0 or a list of them (0 = reconstruction, 1 = DDPM-like), "
                         f"got {eta!r}")
    return e.astype(np.float32)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _unit(x) -> np.ndarray:
    return np.clip(np.asarray(x, np.float32) * 0.5 + 0.5, 0.0, 1.0)


def _feature_extractor(path_or_hub_id, image_encoder):
    """The folder's feature_extractor/ if it has one, else CLIP's processor at the tower's image size."""
    from transformers import CLIPImageProcessorPil
    from unclip_jax.convert.io import resolve_folder
    root = None
    if path_or_hub_id is not None:
        try:
            root = resolve_folder(path_or_hub_id, "feature_extractor")
        except Exception:  # no such files (e.g. a single component's folder): the default processor does
            root = None
    if root is not None and (root / "feature_extractor" / "preprocessor_config.json").exists():
        return CLIPImageProcessorPil.from_pretrained(str(root / "feature_extractor"))
    s = image_encoder.config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


# ---------------------------------------------------------------------------------------------- mixin


class ManipulationsMixin:
    """Paper section 3 (and 2.2's best-of-N prior) on `self.stages` / `self.params` / `self.tokenizer`.

    Every method runs one jitted function per call (a row is one batch); guidance scales, eta and
    thetas are traced, so sweeping them never recompiles. rng: a jax key or an int seed (None: random).
    """

    # ------------------------------------------------------------------------------ components
    def with_component(self, name: str, path_or_hub_id, *, dtype: Any = None, param_dtype: Any = None,
                       **load_kwargs):
        """Loads component `name` ("image_encoder", "prior", ...) from a diffusers folder or hub id and
        attaches it (in the pipeline's dtype unless given); returns self. E.g. a text-to-image pipeline
        with Karlo's vision tower can invert images and compute text diffs from images:

            pipe = UnCLIPPipeline.from_pretrained("kakaobrain/karlo-v1-alpha").with_component(
                "image_encoder", "kakaobrain/karlo-v1-alpha-image-variations")
        """
        from unclip_jax.convert import load_component
        from unclip_jax.convert.io import resolve_folder
        from unclip_jax.diffusion import scheduler as sch
        ref = self.stages.decoder
        module, params = load_component(path_or_hub_id, name, dtype=dtype or getattr(ref, "dtype", jnp.float32),
                                        param_dtype=param_dtype or getattr(ref, "param_dtype", jnp.float32),
                                        **load_kwargs)
        changes = {name: module}
        if name == "prior":
            cfg = resolve_folder(path_or_hub_id, "prior_scheduler") / "prior_scheduler" / "scheduler_config.json"
            if cfg.exists():
                import json
                changes["prior_scheduler"] = sch.SchedulerConfig.from_diffusers(json.loads(cfg.read_text()))
        self.stages = dataclasses.replace(self.stages, **changes)
        self.params = {**self.params, name: params}
        if name == "image_encoder" and getattr(self, "feature_extractor", None) is None:
            self.feature_extractor = _feature_extractor(path_or_hub_id, module)
        return self

    @classmethod
    def from_pretrained_all(cls, path_or_hub_id, **kwargs):
        """`from_pretrained`, plus the prior and image_encoder when the folder has them: one folder that
        holds every component (Karlo's two repositories merged) gives a pipeline that does everything."""
        from unclip_jax.convert.io import resolve_folder
        pipe = cls.from_pretrained(path_or_hub_id, **kwargs)
        root = resolve_folder(path_or_hub_id, None, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
        load = {k: kwargs[k] for k in ("dtype", "param_dtype", "revision", "cache_dir", "variant") if k in kwargs}
        for name in ("prior", "image_encoder"):
            if getattr(pipe.stages, name) is None and (root / name / "config.json").exists():
                pipe.with_component(name, root, **load)
        return pipe

    def _need(self, name: str, what: str, alternative: str = "") -> None:
        if getattr(self.stages, name) is None:
            raise ValueError(f"{what} needs the {name}: {_HOW_TO_GET[name]}{alternative}")

    # ---------------------------------------------------------------------------------- inputs
    def preprocess(self, image) -> jax.Array:
        """Images -> CLIP pixel values (B, S, S, 3) for the vision tower (its feature extractor's recipe)."""
        self._need("image_encoder", "encoding images")
        extractor = getattr(self, "feature_extractor", None) or _feature_extractor(None, self.stages.image_encoder)
        pixels = extractor(images=_pil_list(image), return_tensors="np").pixel_values
        return jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32)

    def embed_images(self, image) -> jax.Array:
        """Images -> CLIP image embeddings z_i (B, D) through the vision tower."""
        return _embed(self.stages, self.params, self.preprocess(image))

    def decoder_pixels(self, image) -> jax.Array:
        """Images -> (B, S, S, 3) in [-1, 1] at the decoder's size (centre crop, bicubic)."""
        return decoder_pixels(image, self.stages.decoder.config.sample_size)

    def _z(self, pics, image_embeddings, what: str) -> jax.Array:
        dim = self.stages.text_proj.config.clip_embeddings_dim
        if image_embeddings is None:
            self._need("image_encoder", what, ", or pass image_embeddings")
            return self.embed_images(pics)
        z = np.asarray(image_embeddings, np.float32)
        if z.ndim == 1:
            z = z[None]
        if z.shape != (len(pics), dim):
            raise ValueError(f"image_embeddings has shape {np.asarray(image_embeddings).shape}; expected "
                             f"({len(pics)}, {dim}) = (number of images, clip_embeddings_dim)")
        return jnp.asarray(z)

    def _uncond(self, guidance: bool):
        return self.encode_prompt([""]) if guidance else None

    def _output(self, images, small, output_type, return_dict, **extra):
        from unclip_jax.pipeline import _to_output
        images = _to_output(images, output_type)
        if not return_dict:
            return (images,)
        extra = {k: (np.asarray(v) if isinstance(v, jax.Array) else v) for k, v in extra.items()}
        return ManipulationOutput(images, _unit(small), **extra)

    # -------------------------------------------------------------------------- section 3: latents
    def invert(self, image, *, caption: str | Sequence[str] | None = None, image_embeddings=None,
               num_inference_steps: int = DEFAULT_INVERSION_STEPS, guidance_scale: float = 1.0,
               max_timestep: int = DEFAULT_MAX_TIMESTEP) -> BipartiteLatent:
        """Images -> their bipartite latents (z_i, x_T) (paper section 3).

        z_i comes from the CLIP vision tower (or image_embeddings (B, D)); x_T from DDIM inversion of
        the image, centre-cropped and resized to the decoder's size, through the decoder conditioned on
        z_i and the caption (default: the empty prompt, as Karlo's variations use).
        guidance_scale: the decoder's, during inversion and (by default) every decoding of the latent;
        1 = the conditional model only, the most exact inversion. The inversion runs
        `num_inference_steps` DDIM steps from t = 0 up to `max_timestep` (see `manipulations.ddim`).
        """
        pics = _pil_list(image)
        ddim.ddim_timesteps(num_inference_steps, max_timestep)  # validates both
        z = self._z(pics, image_embeddings, "inverting an image")
        text = self.encode_prompt(_texts(caption, len(pics), "caption"))
        guidance = float(guidance_scale) > 1.0
        return _invert(self.stages, self.params, self.decoder_pixels(pics), z, text, self._uncond(guidance),
                       jnp.float32(guidance_scale), num_steps=num_inference_steps, max_timestep=max_timestep,
                       guidance=guidance)

    def _latent(self, image_or_latent, what: str, **invert_kwargs) -> BipartiteLatent:
        if isinstance(image_or_latent, BipartiteLatent):
            return image_or_latent
        if image_or_latent is None:
            raise ValueError(f"{what} needs an image (or images) or a BipartiteLatent from pipe.invert")
        return self.invert(image_or_latent, **invert_kwargs)

    def reconstruct(self, image_or_latent, *, rng: Any = 0, super_res_num_inference_steps: int | None = None,
                    clip_sample: bool = False, output_type: str = "pil", return_dict: bool = True, **invert_kwargs):
        """DDIM with eta = 0 from the bipartite latent: the input image again (64x64 stage), then super-res.

        image_or_latent: a BipartiteLatent, or images to invert first (invert_kwargs go to `invert`).
        One super-res noise draw serves the whole batch (as in every row this mixin decodes).
        """
        from unclip_jax.pipeline import _as_rng
        latent = self._latent(image_or_latent, "reconstruct", **invert_kwargs)
        (super_res_num_inference_steps,) = self._settings(super_res_num_inference_steps=super_res_num_inference_steps)
        images, small = self._decode_rows(latent.image_embeddings, latent.text, latent.latents, _as_rng(rng),
                                          latent.guidance_scale, 0.0, latent.num_steps, latent.max_timestep,
                                          latent.guidance, clip_sample, super_res_num_inference_steps)
        return self._output(images, small, output_type, return_dict, image_embeddings=latent.image_embeddings,
                            latent=latent)

    def vary_ddim(self, image_or_latent, *, eta: float | Sequence[float] = 0.5, num_images_per_eta: int = 4,
                  rng: Any = None, decoder_guidance_scale: float | None = None, clip_sample: bool = False,
                  super_res_num_inference_steps: int | None = None, output_type: str = "pil", return_dict: bool = True,
                  **invert_kwargs):
        """Variations from the bipartite latent with DDIM eta > 0 (paper section 3.1, figure 3).

        eta: one value or a list (a sweep, one batch): 0 reconstructs, larger values vary more (1 is
        as random as DDPM). Images come image by image, then eta by eta, then num_images_per_eta.
        decoder_guidance_scale: default the inversion's (another scale no longer retraces the input).
        """
        from unclip_jax.pipeline import _as_rng
        etas = _check_eta(eta)
        k = _positive_int(num_images_per_eta, "num_images_per_eta")
        latent = self._latent(image_or_latent, "vary_ddim", **invert_kwargs)
        (super_res_num_inference_steps,) = self._settings(super_res_num_inference_steps=super_res_num_inference_steps)
        b, e = latent.batch_size, etas.shape[0]
        rows = latent[np.repeat(np.arange(b), e * k)]
        eta_rows = jnp.asarray(np.tile(np.repeat(etas, k), b))
        scale = latent.guidance_scale if decoder_guidance_scale is None else decoder_guidance_scale
        guidance = latent.guidance if decoder_guidance_scale is None else float(decoder_guidance_scale) > 1.0
        images, small = self._decode_rows(rows.image_embeddings, rows.text, rows.latents, _as_rng(rng), scale,
                                          eta_rows, latent.num_steps, latent.max_timestep, guidance, clip_sample,
                                          super_res_num_inference_steps, shared=False)
        return self._output(images, small, output_type, return_dict, image_embeddings=rows.image_embeddings,
                            latent=latent)

    # ------------------------------------------------------------------- section 3.2: interpolation
    def interpolate(self, start, end, *, num_images: int = 5, thetas=None, latents: str = "fixed", rng: Any = None,
                    caption=None, image_embeddings=None, eta: float = 0.0, decoder_guidance_scale: float | None = None,
                    prior_guidance_scale: float | None = None, num_inference_steps: int | None = None,
                    prior_num_inference_steps: int | None = None, guidance_scale: float = 1.0,
                    max_timestep: int = DEFAULT_MAX_TIMESTEP, clip_sample: bool | None = None,
                    super_res_num_inference_steps: int | None = None, output_type: str = "pil",
                    return_dict: bool = True):
        """A row of images between two images (paper section 3.2, figure 4), or between two prompts.

        start, end: two images (PIL or arrays, of one size), two BipartiteLatents (one image each), or
        two prompts (str; needs the prior: the text conditioning is interpolated and each interpolate
        goes through the prior). The image embeddings are slerped (a true slerp on the vectors).
        latents: "fixed" = one random x_T for the whole row, decoded with DDIM (figure 4; the ends are
        variations of the inputs); "inverted" = x_T slerped between the two inverted latents, so that
        the ends reconstruct the inputs (images only; inverted with `guidance_scale`, the empty prompt
        or `caption` (a str or a pair), `num_inference_steps` (default 50) and `max_timestep`).
        num_images: the row's length, ends included (thetas evenly spaced in [0, 1]); or thetas.
        Defaults for a fixed x_T are the model's sampling settings (its unclip_jax.json; else Karlo's: 25
        decoder steps, guidance 8, prior 25 steps at guidance 4), x0 clipped as the decoder's scheduler
        says; for inverted latents the inversion's (no clipping: see `manipulations.ddim`). Super-res
        steps default to the model's setting (else 7) everywhere in this mixin.
        """
        from unclip_jax.pipeline import _as_rng
        th = _thetas(num_images, thetas)
        key = _as_rng(rng)
        (super_res_num_inference_steps,) = self._settings(super_res_num_inference_steps=super_res_num_inference_steps)
        if latents not in ("fixed", "inverted"):
            raise ValueError(f"latents must be 'fixed' (one random x_T per row) or 'inverted' (slerp between the "
                             f"inverted x_T of the two images), got {latents!r}")
        if isinstance(start, str) or isinstance(end, str):
            return self._interpolate_prompts(start, end, th, key, latents, eta, decoder_guidance_scale,
                                             prior_guidance_scale, num_inference_steps, prior_num_inference_steps,
                                             max_timestep, clip_sample, super_res_num_inference_steps, output_type,
                                             return_dict)
        given = isinstance(start, BipartiteLatent), isinstance(end, BipartiteLatent)
        if any(given) and not all(given):
            raise ValueError("give two BipartiteLatents or two images, not one of each")
        if all(given):
            pair = (start, end)
            for z in pair:
                if z.batch_size != 1:
                    raise ValueError(f"interpolate takes latents of one image each, got a batch of {z.batch_size}")
            BipartiteLatent.concatenate(pair)  # checks that they were inverted alike
        else:
            pics = [_pil_list(start), _pil_list(end)]
            if len(pics[0]) != 1 or len(pics[1]) != 1:
                raise ValueError(f"interpolate takes one image at each end, got {len(pics[0])} and {len(pics[1])}")
            pics = [pics[0][0], pics[1][0]]
            if pics[0].size != pics[1].size:
                raise ValueError(f"the two images have different sizes, {pics[0].size} and {pics[1].size} (width, "
                                 "height); an interpolation blends images of one size: resize or crop them first")
            if image_embeddings is not None and len(image_embeddings) != 2:
                raise ValueError("image_embeddings for an interpolation is a pair (start, end)")
            z = self._z(pics, None if image_embeddings is None else
                        np.stack([np.reshape(e, (-1,)) for e in image_embeddings]), "interpolation between images")
            if latents == "inverted":
                both = self.invert(pics, caption=caption, image_embeddings=z, guidance_scale=guidance_scale,
                                   num_inference_steps=num_inference_steps or DEFAULT_INVERSION_STEPS,
                                   max_timestep=max_timestep)
                pair = (both[0], both[1])
            else:  # nothing to invert: the ends are (z_i, caption) only
                text = self.encode_prompt(_texts(caption, 2, "caption"))
                pair = tuple((z[i:i + 1], jax.tree_util.tree_map(lambda x: x[i:i + 1], text)) for i in range(2))
        if latents == "inverted":
            a, b = pair
            steps, top, clip = a.num_steps, a.max_timestep, bool(clip_sample)
            scale = a.guidance_scale if decoder_guidance_scale is None else decoder_guidance_scale
            guidance = a.guidance if decoder_guidance_scale is None else float(decoder_guidance_scale) > 1.0
            ends = (a.image_embeddings, b.image_embeddings, a.text, b.text, a.latents, b.latents)
        else:
            (z_a, text_a), (z_b, text_b) = [(e.image_embeddings, e.text) if isinstance(e, BipartiteLatent) else e
                                            for e in pair]
            steps, scale = self._settings(decoder_num_inference_steps=num_inference_steps,
                                          decoder_guidance_scale=decoder_guidance_scale)
            top = max_timestep
            ddim.ddim_timesteps(steps, top)
            clip = self.stages.decoder_scheduler.clip_sample if clip_sample is None else clip_sample
            guidance = float(scale) > 1.0
            ends = (z_a, z_b, text_a, text_b, None, None)
        z, text, x_t, k_decode = _interpolation_rows(self.stages, ends[0], ends[1], jnp.asarray(th), ends[2], ends[3],
                                                     key, ends[4], ends[5])
        images, small = self._decode_rows(z, text, x_t, k_decode, scale, eta, steps, top, guidance, clip,
                                          super_res_num_inference_steps)
        return self._output(images, small, output_type, return_dict, image_embeddings=z, thetas=th,
                            latent=BipartiteLatent.concatenate(pair) if latents == "inverted" else None)

    def _decode_rows(self, z, text, x_t, key, scale, eta, num_steps, max_timestep, guidance, clip_sample,
                     super_res_num_steps, shared=True):
        """`_decode` with one eta and one key per image, so that every manipulation shares one compiled
        program per batch size: `shared` repeats the key (a row shares its noise), else splits it."""
        n = z.shape[0]
        eta = jnp.broadcast_to(jnp.asarray(eta, jnp.float32), (n,))
        keys = jnp.broadcast_to(key, (n,)) if shared else jax.random.split(key, n)
        return _decode(self.stages, self.params, z, text, self._uncond(guidance), x_t, keys, jnp.float32(scale), eta,
                       num_steps=num_steps, max_timestep=max_timestep, guidance=guidance, clip_sample=clip_sample,
                       super_res_num_steps=super_res_num_steps)

    def _interpolate_prompts(self, start, end, th, key, latents, eta, decoder_guidance_scale, prior_guidance_scale,
                             num_inference_steps, prior_num_inference_steps, max_timestep, clip_sample,
                             super_res_num_inference_steps, output_type, return_dict):
        if not (isinstance(start, str) and isinstance(end, str)):
            raise ValueError("interpolate between two prompts (two str) or two images, not a prompt and an image")
        if latents != "fixed":
            raise ValueError("an interpolation between prompts has no inverted latents: use latents='fixed'")
        self._need("prior", "interpolation between prompts")
        steps, decoder_scale, prior_guidance_scale, prior_num_inference_steps = self._settings(
            decoder_num_inference_steps=num_inference_steps, decoder_guidance_scale=decoder_guidance_scale,
            prior_guidance_scale=prior_guidance_scale, prior_num_inference_steps=prior_num_inference_steps)
        ddim.ddim_timesteps(steps, max_timestep)
        decoder_scale = float(decoder_scale)
        guidance = prior_guidance_scale > 1.0 or decoder_scale > 1.0
        clip = self.stages.decoder_scheduler.clip_sample if clip_sample is None else clip_sample
        z, text, x_t, k_decode = _prompt_rows(self.stages, self.params, self.encode_prompt([start]),
                                              self.encode_prompt([end]), jnp.asarray(th), self._uncond(guidance), key,
                                              jnp.float32(prior_guidance_scale),
                                              prior_num_steps=prior_num_inference_steps, guidance=guidance)
        images, small = self._decode_rows(z, text, x_t, k_decode, decoder_scale, eta, steps, max_timestep, guidance,
                                          clip, super_res_num_inference_steps)
        return self._output(images, small, output_type, return_dict, image_embeddings=z, thetas=th)

    # ---------------------------------------------------------------------- section 3.3: text diffs
    def text_diff(self, image_or_latent, target: str | Sequence[str], *, base: str | Sequence[str] = "a photo",
                  max_theta: float = 0.5, num_images: int = 5, thetas=None, rng: Any = 0, eta: float = 0.0,
                  clip_sample: bool = False, super_res_num_inference_steps: int | None = None, output_type: str = "pil",
                  return_dict: bool = True, **invert_kwargs):
        """Language-guided edits (paper section 3.3, figure 5): per image, a row decoded from
        slerp(z_i, z_d, theta), z_d = normalise(z_t(target) - z_t(base)), theta evenly from 0 (the
        reconstruction) to max_theta (paper: 0.25 to 0.5), with the image's inverted x_T fixed.

        image_or_latent: images (inverted first with invert_kwargs, e.g. caption=) or a BipartiteLatent.
        target: the new caption; base: a caption of the current image, or the paper's dummy "a photo"
        (a str, or one per image). Images come image by image, then theta by theta.
        """
        from unclip_jax.pipeline import _as_rng
        th = _thetas(num_images, thetas, _check_theta(max_theta, "max_theta"))
        latent = self._latent(image_or_latent, "text_diff", **invert_kwargs)
        (super_res_num_inference_steps,) = self._settings(super_res_num_inference_steps=super_res_num_inference_steps)
        b = latent.batch_size
        target_embeds = self.encode_prompt(_texts(target, b, "target")).embeds
        base_embeds = self.encode_prompt(_texts(base, b, "base")).embeds
        z, text, x_t = _text_diff_rows(latent, target_embeds, base_embeds, jnp.asarray(th))
        images, small = self._decode_rows(z, text, x_t, _as_rng(rng), latent.guidance_scale, eta, latent.num_steps,
                                          latent.max_timestep, latent.guidance, clip_sample,
                                          super_res_num_inference_steps)
        return self._output(images, small, output_type, return_dict, image_embeddings=z, thetas=np.tile(th, b),
                            latent=latent)

    # ------------------------------------------------------------------- section 2.2: best-of-N prior
    def sample_best_of_n(self, prompt: str | Sequence[str], *, n: int = 2, num_images_per_prompt: int = 1,
                         rng: Any = None, prior_num_inference_steps: int | None = None,
                         decoder_num_inference_steps: int | None = None,
                         super_res_num_inference_steps: int | None = None, prior_guidance_scale: float | None = None,
                         decoder_guidance_scale: float | None = None, output_type: str = "pil",
                         return_dict: bool = True):
        """Text-to-image with the paper's best-of-N prior: n image embeddings per image, the one with the
        highest dot product with the text embedding (on unit vectors) decoded. n = 1 is plain sampling.
        Steps and guidance scales left at None take the model's settings, else Karlo's (as `__call__`)."""
        from unclip_jax.pipeline import _as_rng, _check_steps
        (prior_num_inference_steps, decoder_num_inference_steps, super_res_num_inference_steps, prior_guidance_scale,
         decoder_guidance_scale) = self._settings(
            prior_num_inference_steps=prior_num_inference_steps,
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, prior_guidance_scale=prior_guidance_scale,
            decoder_guidance_scale=decoder_guidance_scale)
        n = _positive_int(n, "n (the number of prior samples per image)")
        k = _positive_int(num_images_per_prompt, "num_images_per_prompt")
        _check_steps(prior_num_inference_steps=prior_num_inference_steps,
                     decoder_num_inference_steps=decoder_num_inference_steps,
                     super_res_num_inference_steps=super_res_num_inference_steps)
        self._need("prior", "sampling from prompts")
        prompts = _texts(prompt, 1, "prompt") if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        guidance = prior_guidance_scale > 1.0 or decoder_guidance_scale > 1.0
        images, extra = _best_of_n(self.stages, self.params, self.encode_prompt(prompts), self._uncond(guidance),
                                   _as_rng(rng), jnp.float32(prior_guidance_scale), jnp.float32(decoder_guidance_scale),
                                   n=n, num_images_per_prompt=k, prior_num_inference_steps=prior_num_inference_steps,
                                   decoder_num_inference_steps=decoder_num_inference_steps,
                                   super_res_num_inference_steps=super_res_num_inference_steps, guidance=guidance)
        from unclip_jax.pipeline import _to_output
        images = _to_output(images, output_type)
        if not return_dict:
            return (images,)
        return ManipulationOutput(images, None, image_embeddings=np.asarray(extra["image_embeddings"]),
                                  scores=np.asarray(extra["scores"]))

    # -------------------------------------------------------------------------------- inpainting
    def inpaint(self, image, mask, *, prompt: str | Sequence[str] | None = None, image_embeddings=None,
                num_images_per_image: int = 1, rng: Any = None, num_inference_steps: int | None = None,
                resample: int = 5, decoder_guidance_scale: float | None = None,
                prior_guidance_scale: float | None = None, prior_num_inference_steps: int | None = None,
                best_of: int = 1, super_res_num_inference_steps: int | None = None,
                keep_known_pixels: bool = True, output_type: str = "pil", return_dict: bool = True):
        """Regenerates the masked region of an image consistently with the rest and with a prompt or an
        image embedding: RePaint-style resampling in the decoder (each of the `num_inference_steps`
        steps tried `resample` times), then super-res.

        mask: PIL image or array of the image's size (H, W), binary, True / 1 / 255 where the image is
        regenerated. Both are centre-cropped to a square like the decoder's input; at 64x64 a pixel is
        regenerated where any pixel it covers is masked, and the kept ones come out exactly as the input.
        Conditioning: image_embeddings (B, D) if given; else the prompt through the prior (best of
        `best_of` samples); else the image's own CLIP embedding. The decoder's text is the prompt (or "").
        keep_known_pixels: paste the kept pixels in at every super-res step too (so they stay the input's
        at full size) rather than letting super-res redraw them from the 64x64 stage.
        Steps and guidance scales left at None take the model's settings, else Karlo's (25 steps, guidance 8;
        prior 25 steps at guidance 4; super-res 7 steps).
        """
        from unclip_jax.pipeline import _as_rng, _check_steps
        (num_inference_steps, decoder_guidance_scale, prior_guidance_scale, prior_num_inference_steps,
         super_res_num_inference_steps) = self._settings(
            decoder_num_inference_steps=num_inference_steps, decoder_guidance_scale=decoder_guidance_scale,
            prior_guidance_scale=prior_guidance_scale, prior_num_inference_steps=prior_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps)
        _check_steps(num_inference_steps=num_inference_steps,
                     super_res_num_inference_steps=super_res_num_inference_steps)
        resample = _positive_int(resample, "resample")
        copies = _positive_int(num_images_per_image, "num_images_per_image")
        pics = _pil_list(image)
        masks = [mask] if not isinstance(mask, (list, tuple)) else list(mask)
        if len(masks) not in (1, len(pics)):
            raise ValueError(f"got {len(pics)} images and {len(masks)} masks; give one mask, or one per image")
        masks = [binary_mask(m, "mask") for m in masks] * (len(pics) // len(masks))
        for i, (p, m) in enumerate(zip(pics, masks)):
            if m.shape != (p.height, p.width):
                raise ValueError(f"mask {i} has size {m.shape[1]}x{m.shape[0]}; expected the image's size "
                                 f"{p.width}x{p.height} (width x height)")
        key = _as_rng(rng)
        text = self.encode_prompt(_texts(prompt, len(pics), "prompt"))
        guidance = decoder_guidance_scale > 1.0
        uncond = self._uncond(guidance or prior_guidance_scale > 1.0)
        if image_embeddings is not None or prompt is None:
            z = self._z(pics, image_embeddings, "inpainting without a prompt")
        else:
            self._need("prior", "inpainting from a prompt", ", or pass image_embeddings")
            key, k_prior = jax.random.split(key)
            prior_guidance = prior_guidance_scale > 1.0
            z, _, _ = _best_of_n_prior(self.stages, self.params, text, uncond if prior_guidance else None, k_prior,
                                       jnp.float32(prior_guidance_scale), n=_positive_int(best_of, "best_of"),
                                       num_steps=prior_num_inference_steps, guidance=prior_guidance)
        idx = np.repeat(np.arange(len(pics)), copies)
        size = self.stages.decoder.config.sample_size
        small_masks = jnp.stack([_mask_pixels(m, size) for m in masks])
        full = {}
        if keep_known_pixels:
            big = self.stages.super_res_first.config.sample_size
            full = dict(full_images=decoder_pixels(pics, big)[idx],
                        full_mask=jnp.stack([_mask_pixels(m, big) for m in masks])[idx])
        rows = jax.tree_util.tree_map(lambda x: x[idx], text)
        images, small = _inpaint(self.stages, self.params, self.decoder_pixels(pics)[idx], small_masks[idx], z[idx],
                                 rows, uncond if guidance else None, key, jnp.float32(decoder_guidance_scale),
                                 num_steps=num_inference_steps, resample=resample, guidance=guidance,
                                 super_res_num_steps=super_res_num_inference_steps, **full)
        return self._output(images, small, output_type, return_dict, image_embeddings=z[idx])
