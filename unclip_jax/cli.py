"""The `unclip-jax` command: sample, vary, invert, ddim-vary, interpolate, textdiff, inpaint, data build|embed,
evaluate.

    unclip-jax sample --prompt "a red circle on a blue background" --num-images 4 --out out/      # the demo model
    unclip-jax sample --model kakaobrain/karlo-v1-alpha --prompt "a red panda" --num-images 4 --out out/
    unclip-jax vary --model kakaobrain/karlo-image-variations-diffusers --image cat.png --out out/
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from unclip_jax.pipeline import KARLO_SETTINGS  # diffusers' defaults, unless the flag or the model says otherwise

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="diffusers unCLIP folder or hub id (default: the shipped demo "
                   "model, trained on captioned shapes; e.g. kakaobrain/karlo-v1-alpha for Karlo)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt / per input image")
    p.add_argument("--seed", type=int, default=0)
    # None: the model's own settings (its unclip_jax.json, e.g. the demo's), else Karlo's (KARLO_SETTINGS).
    p.add_argument("--decoder-steps", type=int, default=None, help="default: the model's setting, else 25")
    p.add_argument("--super-res-steps", type=int, default=None, help="default: the model's setting, else 7")
    p.add_argument("--decoder-guidance", type=float, default=None, help="default: the model's setting, else 8.0")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype of the networks")
    p.add_argument("--out", default="unclip_out", help="folder for the PNGs and the grid")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache: later runs skip compiling")


_FLAGS = dict(prior_num_inference_steps="prior_steps", decoder_num_inference_steps="decoder_steps",
              super_res_num_inference_steps="super_res_steps", prior_guidance_scale="prior_guidance",
              decoder_guidance_scale="decoder_guidance")


def sampling_settings(args, pipe, names) -> dict:
    """Each setting from its flag when given, else the model's sampling_defaults, else Karlo's."""
    names = tuple(names)
    return dict(zip(names, pipe._settings(**{name: getattr(args, _FLAGS[name], None) for name in names})))


def _report(out, seconds: float, paths) -> None:
    timings = getattr(out, "timings", None)
    if timings:
        for stage, t in timings.items():
            print(f"  {stage:<20} compile {t['compile_s']:7.2f} s   run {t['run_s']:7.2f} s")
        total_compile = sum(t["compile_s"] for t in timings.values())
        total_run = sum(t["run_s"] for t in timings.values())
        print(f"  {'total':<20} compile {total_compile:7.2f} s   run {total_run:7.2f} s   (wall {seconds:.2f} s)")
    print(f"wrote {len(paths) - 1} image(s) and {paths[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unclip-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text-to-image")
    _common(s)
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    s.add_argument("--prior-steps", type=int, default=None, help="default: the model's setting, else 25")
    s.add_argument("--prior-guidance", type=float, default=None, help="default: the model's setting, else 4.0")
    s.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="the paper's best-of-N prior: N image embeddings per image, the one closest to the text kept")

    v = sub.add_parser("vary", help="image variations")
    _common(v)
    v.add_argument("--image", action="append", required=True, help="input image file; repeat for several")

    from unclip_jax import manipulations_cli
    from unclip_jax.data import cli as data_cli
    from unclip_jax.demo import evaluate as demo_evaluate
    manipulations_cli.add_subcommands(sub)
    data_cli.add_subcommands(sub)
    demo_evaluate.add_subcommand(sub)

    args = parser.parse_args(argv)
    if args.command == "data":
        return data_cli.run(args)
    if args.command == "evaluate":
        return demo_evaluate.run(args, parser.error)
    if args.command in manipulations_cli.SUBCOMMANDS:
        return manipulations_cli.run(args, parser.error)
    import unclip_jax
    from unclip_jax.images import save_images
    if args.compilation_cache:
        unclip_jax.enable_compilation_cache(args.compilation_cache)

    t0 = time.perf_counter()
    if args.command == "sample":
        pipe = unclip_jax.UnCLIPPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype])
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        kw = dict(rng=args.seed, num_images_per_prompt=args.num_images, output_type="np",
                  **sampling_settings(args, pipe, KARLO_SETTINGS))
        if args.best_of > 1:
            out = pipe.sample_best_of_n(args.prompt, n=args.best_of, **kw)
        else:
            out = pipe(args.prompt, profile=True, **kw)
    else:
        from PIL import Image
        images = []
        for path in args.image:
            try:
                images.append(Image.open(path).convert("RGB"))
            except (OSError, ValueError) as e:
                parser.error(f"cannot read image {path}: {e}")
        pipe = unclip_jax.UnCLIPImageVariationPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype])
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        out = pipe(images, rng=args.seed, num_images_per_prompt=args.num_images, output_type="np", profile=True,
                   **sampling_settings(args, pipe, ("decoder_num_inference_steps", "super_res_num_inference_steps",
                                                    "decoder_guidance_scale")))
    seconds = time.perf_counter() - t0
    paths = save_images(out.images, args.out, prefix=args.command, cols=args.num_images)
    _report(out, seconds, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
