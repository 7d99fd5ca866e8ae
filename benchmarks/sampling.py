"""Sampling speed: unclip_jax against diffusers on the same random-weight unCLIP stack, in one run.

    python benchmarks/sampling.py                       # the small CPU configuration, batch 1 and 4
    python benchmarks/sampling.py --preset karlo --batch 1 8 32 --dtype bf16   # on a GPU (diffusers in fp16)

Both sides get the same prompts, steps (25/25/7) and guidance (4/8), after a warm-up call; unclip_jax's
compile time is reported separately (its first call minus a steady-state call). Prints images/s for
both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import jax
import jax.numpy as jnp
import numpy as np
import torch

PRESETS = {
    # channels around 64-128, 64 -> 128 super-res: issue #3's CPU configuration
    "small": dict(dim=64, text_len=77, size=64, channels=(64, 128), layers_per_block=2, groups=32, head_dim=64,
                  prior_heads=2, prior_head_dim=64, prior_layers=4, text_layers=4, cross=128),
    # Karlo v1 alpha's shapes (random weights): 768-d CLIP, 2048-wide prior, 320..1280 UNets, 64 -> 256
    "karlo": dict(dim=768, text_len=77, size=64, channels=(320, 640, 960, 1280), layers_per_block=3, groups=32,
                  head_dim=64, prior_heads=32, prior_head_dim=64, prior_layers=20, text_layers=12, cross=1536),
}


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="unclip_jax compute dtype; diffusers runs fp16 on a GPU when bf16 is asked, fp32 otherwise")
    ap.add_argument("--steps", type=int, nargs=3, default=[25, 25, 7], metavar=("PRIOR", "DECODER", "SUPER_RES"))
    args = ap.parse_args()

    import tiny_unclip
    import unclip_jax

    root = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    ref, _ = tiny_unclip.build(root, **PRESETS[args.preset])
    print(f"built and saved the {args.preset} random-weight stack in {time.perf_counter() - t0:.1f} s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.float16 if (args.dtype == "bf16" and device == "cuda") else torch.float32
    ref = ref.to(device, torch_dtype)
    ref.set_progress_bar_config(disable=True)
    pipe = unclip_jax.UnCLIPPipeline.from_pretrained(root / "unclip",
                                                      dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    steps = dict(prior_num_inference_steps=args.steps[0], decoder_num_inference_steps=args.steps[1],
                 super_res_num_inference_steps=args.steps[2])
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {device} "
          f"({torch.get_num_threads()} threads); steps {args.steps}, guidance 4/8")
    print(f"{'batch':>5} {'diffusers img/s':>16} {'unclip_jax img/s':>17} {'ratio':>6} {'jax compile s':>14}")
    for b in args.batch:
        prompts = [f"prompt number {i}" for i in range(b)]
        run_ref = lambda: ref(prompts, output_type="np", generator=torch.Generator(device).manual_seed(0), **steps)
        run_jax = lambda: pipe(prompts, rng=0, output_type="jax", **steps).images.block_until_ready()
        with torch.no_grad():
            run_ref()
            t_ref = timed(run_ref, args.repeats)
        t0 = time.perf_counter()
        run_jax()
        first = time.perf_counter() - t0
        t_jax = timed(run_jax, args.repeats)
        print(f"{b:>5} {b / t_ref:>16.3f} {b / t_jax:>17.3f} {t_ref / t_jax:>6.2f} {first - t_jax:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
