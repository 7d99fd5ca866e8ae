"""Karlo-size compile time and model FLOPs, without allocating a single weight (abstract parameters).

    python benchmarks/karlo_compile.py [--batch 1] [--dtype bf16]

1. Compiles the whole text-to-image function (prior 25 / decoder 25 / super-res 7 steps, guidance on) with
   jit(...).lower(shapes).compile() and reports the time: what a user waits for before the first image.
2. Counts FLOPs per image from XLA's cost analysis of one forward pass of each network, times the steps
   and the guidance batch (XLA counts a while loop's body once, so the scan itself cannot be used).
Runs on whatever backend jax has (the CPU here: the compile time then is the CPU backend's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from unclip_jax import sampling
from unclip_jax.models import abstract_params, from_config
from unclip_jax.models.karlo import KARLO


def flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--skip-compile", action="store_true", help="only count FLOPs")
    args = ap.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    names = ("text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last")
    modules = {n: from_config(n, KARLO[n], dtype=dtype) for n in names}
    params = {n: abstract_params(m)[0] for n, m in modules.items()}
    stages = sampling.Stages(**modules)
    sds = jax.ShapeDtypeStruct
    b = args.batch
    tokens = sampling.Tokens(sds((b, 77), jnp.int32), sds((b, 77), jnp.bool_))
    uncond = sampling.Tokens(sds((1, 77), jnp.int32), sds((1, 77), jnp.bool_))
    key = jax.eval_shape(lambda: jax.random.key(0))
    print(f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"batch {b}, {args.dtype}")

    if not args.skip_compile:
        fn = jax.jit(sampling.text_to_image, static_argnums=0)
        t0 = time.perf_counter()
        lowered = fn.lower(stages, params, tokens, uncond, key, jnp.float32(4.0), jnp.float32(8.0))
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        print(f"whole pipeline (25/25/7, guidance): trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")

    # FLOPs of one forward of each network at the batch it runs with (2b under guidance).
    g = 2 * b
    f = {}
    f["prior"] = flops(lambda p, x, t, e, h, m: modules["prior"].apply({"params": p}, x, t, e, h, m),
                       params["prior"], sds((g, 768), jnp.float32), sds((), jnp.int32), sds((g, 768), jnp.float32),
                       sds((g, 77, 768), jnp.float32), sds((g, 77), jnp.bool_))
    dec = modules["decoder"]
    f["decoder"] = flops(lambda p, x, t, c, l, m: dec.apply({"params": p}, x, t, encoder_hidden_states=c,
                                                            class_labels=l, attention_mask=m),
                         params["decoder"], sds((g, 64, 64, 3), jnp.float32), sds((), jnp.int32),
                         sds((g, 81, 1536), jnp.float32), sds((g, 1280), jnp.float32), sds((g, 81), jnp.bool_))
    sr = modules["super_res_first"]
    f["super_res"] = flops(lambda p, x, t: sr.apply({"params": p}, x, t), params["super_res_first"],
                           sds((b, 256, 256, 6), jnp.float32), sds((), jnp.int32))
    per_image = {"prior": 25 * f["prior"] / b, "decoder": 25 * f["decoder"] / b, "super_res": 7 * f["super_res"] / b}
    total = sum(per_image.values())
    for k, v in per_image.items():
        print(f"  {k:<10} {v / 1e12:7.2f} TFLOP per image ({100 * v / total:4.1f}%)")
    print(f"  {'total':<10} {total / 1e12:7.2f} TFLOP per image at 25/25/7 with guidance; "
          f"floor on an H100 (~790 TFLOP/s bf16 measured peak): {total / 790e12:.3f} s per image")


if __name__ == "__main__":
    main()
