"""`unclip-jax` subcommands for the paper's image manipulations (section 3); each writes its PNGs and
the row(s) as one strip, `<command>_grid.png`:

    unclip-jax invert      --model M --image cat.png                     # input | DDIM reconstruction, + latent.npz
    unclip-jax ddim-vary   --model M --image cat.png --eta 0 --eta 0.5 --eta 1 --num-images 4   # figure 3
    unclip-jax interpolate --model M --image cat.png --image dog.png --num-images 7           # figure 4
    unclip-jax interpolate --model M --prompt "a cat" --prompt "a dog"      (needs the prior)
    unclip-jax textdiff    --model M --image cat.png --base "a photo of a cat" --target "an anime drawing of a cat"
    unclip-jax inpaint     --model M --image cat.png --mask mask.png [--prompt "a cat wearing a hat"]

M: a diffusers unCLIP folder or hub id. Images in need the CLIP vision tower, prompts the prior: the
folder's model_index.json picks the pipeline class, every component the folder has is loaded, and
--image-encoder / --prior PATH attach one from another folder (e.g. Karlo's two repositories).
`ddim-vary` is the paper's variation (DDIM with eta from the inverted latent); `vary` stays Karlo's
(fresh noise, ancestral sampler).

Wiring into unclip_jax.cli: `add_subcommands(sub)` on its subparsers, then
`if args.command in SUBCOMMANDS: return run(args)`. `python -m unclip_jax.manipulations_cli` runs them alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SUBCOMMANDS = ("invert", "ddim-vary", "interpolate", "textdiff", "inpaint")
_DTYPES = ("fp32", "bf16")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="diffusers unCLIP folder or hub id (default: the shipped demo "
                   "model, trained on captioned shapes; e.g. kakaobrain/karlo-v1-alpha for Karlo)")
    p.add_argument("--image-encoder", default=None, metavar="PATH", help="attach the CLIP vision tower of this folder")
    p.add_argument("--prior", default=None, metavar="PATH", help="attach the prior of this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--super-res-steps", type=int, default=None, help="default: the model's setting, else 7")
    p.add_argument("--dtype", choices=_DTYPES, default="fp32", help="compute dtype of the networks")
    p.add_argument("--out", default="unclip_out", help="folder for the PNGs and the strip")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache: later runs skip compiling")


def _inversion(p: argparse.ArgumentParser, steps: int | None = 50) -> None:
    p.add_argument("--caption", default=None, help="caption the decoder sees during inversion (default: none)")
    p.add_argument("--steps", type=int, default=steps, help="DDIM steps of the inversion and the decoding")
    p.add_argument("--inversion-guidance", type=float, default=1.0,
                   help="decoder guidance scale of the inversion and its decoding (1 = conditional only)")
    p.add_argument("--max-timestep", type=int, default=990, help="the DDIM schedule's first (noisiest) timestep")


def add_subcommands(subparsers) -> None:
    """Adds invert, ddim-vary, interpolate, textdiff and inpaint to an argparse subparsers object."""
    p = subparsers.add_parser("invert", help="image -> bipartite latent (z_i, x_T) and its reconstruction")
    _common(p)
    _inversion(p)
    p.add_argument("--image", action="append", required=True, help="input image file; repeat for several")

    p = subparsers.add_parser("ddim-vary", help="paper-style variations: DDIM with eta from the inverted latent")
    _common(p)
    _inversion(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", action="append", help="input image file; repeat for several")
    src.add_argument("--latent", help="a latent.npz written by `invert` (skips the inversion)")
    p.add_argument("--eta", type=float, action="append", help="repeat for a sweep (default 0, 0.5, 1)")
    p.add_argument("--num-images", type=int, default=3, help="variations per eta")

    p = subparsers.add_parser("interpolate", help="a row between two images or two prompts")
    _common(p)
    _inversion(p, steps=None)
    ends = p.add_mutually_exclusive_group(required=True)
    ends.add_argument("--image", action="append", help="give exactly two")
    ends.add_argument("--prompt", action="append", help="give exactly two (needs the prior)")
    p.add_argument("--num-images", type=int, default=7, help="images in the row, ends included")
    p.add_argument("--latents", choices=("fixed", "inverted"), default="fixed",
                   help="fixed: one random x_T for the row (figure 4); inverted: slerp of the inverted x_T")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=None,
                   help="decoder guidance (default: the model's setting, else 8; the inversion's with --latents "
                        "inverted)")
    p.add_argument("--prior-steps", type=int, default=None, help="default: the model's setting, else 25")
    p.add_argument("--prior-guidance", type=float, default=None, help="default: the model's setting, else 4")

    p = subparsers.add_parser("textdiff", help="language-guided edit: slerp(z_i, z_d, theta) with x_T fixed")
    _common(p)
    _inversion(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", action="append", help="input image file; repeat for several")
    src.add_argument("--latent", help="a latent.npz written by `invert`")
    p.add_argument("--target", required=True, help="the caption to move towards")
    p.add_argument("--base", default="a photo", help="a caption of the current image (default: 'a photo')")
    p.add_argument("--max-theta", type=float, default=0.5)
    p.add_argument("--num-images", type=int, default=5, help="thetas from 0 to --max-theta")

    p = subparsers.add_parser("inpaint", help="regenerate the masked region (white = regenerate)")
    _common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="binary image of the same size, white where the image is redrawn")
    p.add_argument("--prompt", default=None, help="what to draw there (needs the prior); default: the image itself")
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="decoder steps (default: the model's setting, else 25)")
    p.add_argument("--resample", type=int, default=5, help="RePaint tries per step")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's setting, else 8")
    p.add_argument("--prior-steps", type=int, default=None, help="default: the model's setting, else 25")
    p.add_argument("--prior-guidance", type=float, default=None, help="default: the model's setting, else 4")
    p.add_argument("--best-of", type=int, default=1, help="prior samples per image, the closest to the prompt kept")


def _pipeline(args, *, wants_prior: bool):
    """The folder's own pipeline class (model_index.json), with every component it has, plus --prior and
    --image-encoder."""
    import jax.numpy as jnp
    import unclip_jax
    from unclip_jax.convert.io import resolve_folder
    if args.compilation_cache:
        unclip_jax.enable_compilation_cache(args.compilation_cache)
    root = resolve_folder(args.model, None, patterns=("model_index.json",))
    index = root / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.exists() else ""
    cls = unclip_jax.UnCLIPImageVariationPipeline if "Variation" in name else unclip_jax.UnCLIPPipeline
    if not name and not wants_prior:
        cls = unclip_jax.UnCLIPImageVariationPipeline
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    t0 = time.perf_counter()
    pipe = cls.from_pretrained_all(args.model, dtype=dtype)
    for component, path in (("prior", args.prior), ("image_encoder", args.image_encoder)):
        if path:
            pipe.with_component(component, path)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    return pipe


def _read(parser_error, path):
    from PIL import Image
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        parser_error(f"cannot read image {path}: {e}")


def _shown(pic, size: int) -> np.ndarray:
    """An input as it appears in a strip: the decoder's centre crop, at the output size, in [0, 1]."""
    from PIL import Image
    from unclip_jax.manipulations.mixin import _square
    return np.asarray(_square(pic, size, Image.BICUBIC), np.float32) / 255.0


def _invert_kwargs(args) -> dict:
    kw = dict(caption=args.caption, guidance_scale=args.inversion_guidance, max_timestep=args.max_timestep)
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    return kw


def _source(args, pipe, error):
    """--latent file, or the --image files (inverted by the method itself)."""
    from unclip_jax.manipulations import load_latent
    if getattr(args, "latent", None):
        return load_latent(args.latent), {}
    return [_read(error, p) for p in args.image], _invert_kwargs(args)


def run(args, error=None) -> int:
    """Runs one of SUBCOMMANDS on parsed args; prints what it wrote. error: argparse's parser.error."""
    if error is None:
        def error(message):
            raise SystemExit(f"unclip-jax {args.command}: error: {message}")
    from unclip_jax.images import save_images
    cmd = args.command
    t0 = None
    # super-res steps None: the pipeline takes the model's setting, else Karlo's
    common = dict(rng=args.seed, super_res_num_inference_steps=args.super_res_steps, output_type="np")
    if cmd == "invert":
        pipe = _pipeline(args, wants_prior=False)
        pics = [_read(error, p) for p in args.image]
        t0 = time.perf_counter()
        latent = pipe.invert(pics, **_invert_kwargs(args))
        out = pipe.reconstruct(latent, **common)
        size = out.images.shape[1]
        error_64 = np.abs(out.decoder_output - (np.asarray(pipe.decoder_pixels(pics)) * 0.5 + 0.5)).mean()
        print(f"mean |reconstruction - input| at the decoder's size: {error_64:.4f} (pixel values in [0, 1])")
        images = [x for pic, rec in zip(pics, out.images) for x in (_shown(pic, size), rec)]
        from unclip_jax.manipulations import save_latent
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_latent(Path(args.out) / "latent.npz", latent)
        cols = 2
    elif cmd == "ddim-vary":
        pipe = _pipeline(args, wants_prior=False)
        source, kw = _source(args, pipe, error)
        etas = args.eta or [0.0, 0.5, 1.0]
        t0 = time.perf_counter()
        out = pipe.vary_ddim(source, eta=etas, num_images_per_eta=args.num_images, **common, **kw)
        images, cols = out.images, args.num_images
    elif cmd == "interpolate":
        ends = args.prompt or args.image
        if len(ends) != 2:
            error(f"interpolate needs exactly two --image or two --prompt, got {len(ends)}")
        pipe = _pipeline(args, wants_prior=bool(args.prompt))
        if args.image:
            ends = [_read(error, p) for p in ends]
        t0 = time.perf_counter()
        out = pipe.interpolate(ends[0], ends[1], num_images=args.num_images, latents=args.latents, eta=args.eta,
                               caption=args.caption, decoder_guidance_scale=args.guidance,
                               prior_guidance_scale=args.prior_guidance, num_inference_steps=args.steps,
                               prior_num_inference_steps=args.prior_steps, guidance_scale=args.inversion_guidance,
                               max_timestep=args.max_timestep, **common)
        images, cols = out.images, args.num_images
    elif cmd == "textdiff":
        pipe = _pipeline(args, wants_prior=False)
        source, kw = _source(args, pipe, error)
        t0 = time.perf_counter()
        out = pipe.text_diff(source, args.target, base=args.base, max_theta=args.max_theta,
                             num_images=args.num_images, **common, **kw)
        images, cols = out.images, args.num_images
    elif cmd == "inpaint":
        pipe = _pipeline(args, wants_prior=bool(args.prompt))
        pic, mask = _read(error, args.image), _read(error, args.mask)
        t0 = time.perf_counter()
        out = pipe.inpaint(pic, mask, prompt=args.prompt, num_images_per_image=args.num_images,
                           num_inference_steps=args.steps, resample=args.resample,
                           decoder_guidance_scale=args.guidance, prior_guidance_scale=args.prior_guidance,
                           prior_num_inference_steps=args.prior_steps, best_of=args.best_of, **common)
        size = out.images.shape[1]
        shown = _shown(pic, size)
        from unclip_jax.manipulations.mixin import binary_mask, _mask_pixels
        hole = np.asarray(_mask_pixels(binary_mask(mask.convert("L")), size))
        images = [shown, shown * (1 - hole) + 0.5 * hole] + list(out.images)
        cols = len(images)
    else:
        error(f"unknown manipulation {cmd!r}; expected one of {', '.join(SUBCOMMANDS)}")
    print(f"{cmd}: {time.perf_counter() - t0:.1f} s (compilation included)")
    paths = save_images(np.stack(images), args.out, prefix=cmd.replace("-", "_"), cols=cols)
    print(f"wrote {len(paths) - 1} image(s) and the strip {paths[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unclip-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run(args, parser.error)


if __name__ == "__main__":
    sys.exit(main())
