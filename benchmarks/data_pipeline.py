"""Input pipeline speed, alone (no model): examples/s per stage, host vs device degradation, and the cost of
storing the text tower's hidden states against recomputing them.

    python benchmarks/data_pipeline.py                  # about 3 minutes on 2 CPU cores
    python benchmarks/data_pipeline.py --examples 1024 --batch 256 --json out.json

1. Builds a dataset of LAION-like photos (JPEG q90, shorter side 512 px; and a few at 1024 px for the 1024
   upsampler) with `build_dataset`, and writes Karlo-sized embeddings (D = 768, L = 77) in the embed job's
   format, so no CLIP weights are needed.
2. Per-image decode cost (single thread): Pillow's JPEG draft (DCT-domain downscale) against a full decode,
   and CLIP preprocessing for the embed job.
3. Each stage's source, steady state after warm-up, at the default thread count.
4. Degradation: numpy on the host (per example, one thread) against the jitted jax version, and its FLOPs.
5. Text hidden states: bytes per example stored, against the text tower's FLOPs per example next to the
   prior's and decoder's train-step FLOPs (XLA cost analysis at Karlo size, nothing allocated).
"""

from __future__ import annotations

import os

# One BLAS thread: the pipeline's worker threads are the parallelism. On this 2-core VM, OpenBLAS's own threads
# make host degradation 8x slower (see benchmarks/DATA.md); set it before numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax.data import build_dataset, decoder_source, degrade, load_dataset, prior_source, upsampler_source
from unclip_jax.data.embed import META_FILE, PROGRESS_FILE, _fields, _part_name, dataset_fingerprint
from unclip_jax.data.sources import load_crop

ROWS: list[tuple[str, str, str]] = []


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"  {what:<58} {value:>16}  {note}", flush=True)


def photo(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth structure plus fine texture: JPEG sizes like real photos' (tens of KB at 512 px)."""
    coarse = Image.fromarray(rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float32)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))


def make_dataset(root: Path, n: int, short: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / f"photos{short}"
    folder.mkdir(parents=True)
    for i in range(n):
        long = int(short * rng.uniform(1.0, 1.5))
        h, w = (short, long) if i % 2 else (long, short)
        photo(rng, h, w).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a photo of thing number {i}")
    out = root / f"ds{short}"
    mean_kb = np.mean([f.stat().st_size for f in folder.glob("*.jpg")]) / 1024
    t0 = time.perf_counter()
    report = build_dataset(folder, out, verbose=False)
    dt = time.perf_counter() - t0
    row(f"build_dataset, {short} px JPEGs ({report.kept}, {mean_kb:.0f} KB each)", f"{report.kept / dt:.0f} ex/s",
        "check + copy bytes; tfds writes and shuffles")
    return out


def fake_embeddings(dataset: Path, d: int = 768, length: int = 77, hidden: bool = False) -> Path:
    """Karlo-sized random embeddings in the embed job's layout (meta.json + part-00000-of-00001/)."""
    n = load_dataset(dataset).info.splits["train"].num_examples
    out = dataset / ("embeddings_hidden" if hidden else "embeddings")
    part = out / _part_name(0, 1)
    part.mkdir(parents=True)
    fields = _fields(d, length, d, hidden)
    rng = np.random.default_rng(0)
    for k, (shape, dtype) in fields.items():
        a = np.lib.format.open_memmap(part / f"{k}.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, *shape))
        a[:] = rng.standard_normal(a.shape).astype(dtype) if dtype.startswith("float") else 1
        a.flush()
    (part / PROGRESS_FILE).write_text(json.dumps({"done": n, "truncated": 0}))
    (out / META_FILE).write_text(json.dumps({
        "format_version": 1, "model": "random", "image_model": "random", "dtype": "float32",
        "dataset": str(dataset), "dataset_fingerprint": dataset_fingerprint(dataset), "split": "train",
        "num_examples": n, "process_count": 1, "embed_dim": d, "text_len": length,
        "fields": {k: [list(s), t] for k, (s, t) in fields.items()}}))
    return out


def source_rate(source, batches: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        next(source)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(source)
        n += len(next(iter(b.values())))
    rate = n / (time.perf_counter() - t0)
    source.close()
    return rate


def per_call(fn, items, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        for x in items:
            fn(x)
    return (time.perf_counter() - t0) / (repeat * len(items))


def flops_of(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).cost_analysis().get("flops", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=512, help="photos at 512 px")
    ap.add_argument("--batch", type=int, default=128, help="host batch of the sources")
    ap.add_argument("--batches", type=int, default=10, help="timed batches per source")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("1. datasets")
        ds512 = make_dataset(root, args.examples, 512, seed=0)
        ds1024 = make_dataset(root, max(64, args.batch // 2), 1024, seed=1)
        fake_embeddings(ds512)

        print("2. per-image decode, one thread")
        records = load_dataset(ds512).as_data_source("train", decoders={"image": __import__(
            "tensorflow_datasets").decode.SkipDecoding()})
        blobs = [records[i]["image"] for i in range(64)]
        full = per_call(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), blobs)
        row("full JPEG decode of a 512 px photo", f"{1e3 * full:.2f} ms", f"{1 / full:.0f} img/s per core")
        t = per_call(lambda b: load_crop(b, scale_to=64, crop=64), blobs)
        row("decoder crop 64 px (JPEG draft 1/8 + bicubic)", f"{1e3 * t:.2f} ms", f"{1 / t:.0f} img/s per core")
        t = per_call(lambda b: load_crop(b, scale_to=256, crop=64, rng=np.random.default_rng(0)), blobs)
        row("upsampler crop 64 of 256 px (draft 1/2)", f"{1e3 * t:.2f} ms", f"{1 / t:.0f} img/s per core")
        from transformers import CLIPImageProcessorPil

        from unclip_jax.data.embed import clip_pixels
        processor = CLIPImageProcessorPil()
        t = per_call(lambda b: clip_pixels(processor, b), blobs[:32])
        row("embed job: CLIP preprocessing to 224 px", f"{1e3 * t:.2f} ms", f"{1 / t:.0f} img/s per core")

        print(f"3. sources, host batch {args.batch}, default threads")
        kw = dict(global_batch=args.batch, seed=0, process_index=0, process_count=1)
        rate = source_rate(prior_source(ds512, **kw), 4 * args.batches)
        row("prior (embeddings + tokens, no images)", f"{rate:.0f} ex/s")
        row("decoder 64 px", f"{source_rate(decoder_source(ds512, image_size=64, **kw), args.batches):.0f} ex/s")
        row("upsampler 64 -> 256: 64 px crops, degraded on device",
            f"{source_rate(upsampler_source(ds512, target_size=256, **kw), args.batches):.0f} ex/s")
        row("upsampler 64 -> 256: 64 px crops + host blur (low_res)",
            f"{source_rate(upsampler_source(ds512, target_size=256, degrade_on='host', **kw), args.batches):.0f} ex/s")
        small = dict(kw, global_batch=max(16, args.batch // 4))
        row("upsampler 256 -> 1024: 256 px crops of 1024 px photos",
            f"{source_rate(upsampler_source(ds1024, target_size=1024, degrade_kind='bsr', **small), 3):.0f} ex/s")
        rate = source_rate(upsampler_source(ds1024, target_size=1024, degrade_kind="bsr", degrade_on="host",
                                            **small), 3)
        row("upsampler 256 -> 1024: + host BSR (low_res 64 px)", f"{rate:.0f} ex/s")

    print("4. degradation: host numpy (per example, one thread) vs jitted jax (batch 64, this backend)")
    rng = np.random.default_rng(0)
    for kind, size in (("blur", 64), ("bsr", 256)):
        x = rng.uniform(-1, 1, (64, size, size, 3)).astype(np.float32)
        t_host = per_call(lambda i: degrade.degrade_np(rng, x[i:i + 1], kind=kind, factor=4), range(16))
        f = jax.jit(degrade.degrade_jax, static_argnames=("kind", "factor"))
        xd = jnp.asarray(x)
        jax.block_until_ready(f(jax.random.key(0), xd, kind=kind, factor=4))
        t0 = time.perf_counter()
        for i in range(5):
            jax.block_until_ready(f(jax.random.key(i), xd, kind=kind, factor=4))
        t_dev = (time.perf_counter() - t0) / (5 * 64)
        fl = flops_of(lambda k, x: degrade.degrade_jax(k, x, kind=kind, factor=4), jax.random.key(0),
                      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        row(f"{kind} {size} -> {size // 4}: host numpy", f"{1e3 * t_host:.3f} ms/ex", f"{1 / t_host:.0f} ex/s per core")
        row(f"{kind} {size} -> {size // 4}: jax on {jax.default_backend()}", f"{1e3 * t_dev:.3f} ms/ex",
            f"{fl / 1e6:.1f} MFLOP/ex (XLA)")

    print("5. text hidden states: store or recompute (Karlo sizes, XLA cost analysis, nothing allocated)")
    from unclip_jax.models import abstract_params, from_config
    from unclip_jax.models.karlo import KARLO
    sds = jax.ShapeDtypeStruct
    mods = {n: from_config(n, KARLO[n], dtype=jnp.bfloat16)
            for n in ("text_encoder", "image_encoder", "prior", "decoder", "super_res_first")}
    prm = {n: abstract_params(m)[0] for n, m in mods.items()}
    text = flops_of(lambda p, i, a: mods["text_encoder"].apply({"params": p}, i, a), prm["text_encoder"],
                    sds((1, 77), jnp.int32), sds((1, 77), jnp.bool_))
    prior = flops_of(lambda p, x, t, e, h, m: mods["prior"].apply({"params": p}, x, t, e, h, m), prm["prior"],
                     sds((1, 768), jnp.float32), sds((), jnp.int32), sds((1, 768), jnp.float32),
                     sds((1, 77, 768), jnp.float32), sds((1, 77), jnp.bool_))
    dec = mods["decoder"]
    decoder = flops_of(lambda p, x, t, c, l, m: dec.apply({"params": p}, x, t, encoder_hidden_states=c,
                                                          class_labels=l, attention_mask=m),
                       prm["decoder"], sds((1, 64, 64, 3), jnp.float32), sds((), jnp.int32),
                       sds((1, 81, 1536), jnp.float32), sds((1, 1280), jnp.float32), sds((1, 81), jnp.bool_))
    vision = flops_of(lambda p, x: mods["image_encoder"].apply({"params": p}, x), prm["image_encoder"],
                      sds((1, 224, 224, 3), jnp.float32))
    sr = mods["super_res_first"]
    super_res = flops_of(lambda p, x, t: sr.apply({"params": p}, x, t), prm["super_res_first"],
                         sds((1, 64, 64, 6), jnp.float32), sds((), jnp.int32))
    stored = 77 * 768 * 2
    rest = sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t in _fields(768, 77, 768, False).values())
    row("stored text_hidden_states (77 x 768 fp16)", f"{stored / 1024:.0f} KiB/ex",
        f"vs {rest / 1024:.1f} KiB/ex for everything else")
    row("text tower forward (recompute)", f"{text / 1e9:.1f} GFLOP/ex")
    row("prior train step (fwd + bwd ~ 3 x fwd)", f"{3 * prior / 1e9:.0f} GFLOP/ex",
        f"recompute adds {100 * text / (3 * prior):.1f}%")
    row("decoder train step (fwd + bwd ~ 3 x fwd)", f"{3 * decoder / 1e9:.0f} GFLOP/ex",
        f"recompute adds {100 * text / (3 * decoder):.1f}%")
    with tempfile.TemporaryDirectory() as tmp:
        n = 2048
        a = np.lib.format.open_memmap(Path(tmp) / "h.npy", mode="w+", dtype=np.float16, shape=(n, 77, 768))
        a[:] = 1
        a.flush()
        del a
        a = np.load(Path(tmp) / "h.npy", mmap_mode="r")
        idx = np.random.default_rng(0).permutation(n)
        t0 = time.perf_counter()
        for i in range(0, n, 256):
            np.asarray(a[np.sort(idx[i:i + 256])])
        dt = time.perf_counter() - t0
        row("random-order read of stored hidden states (page cache)", f"{n / dt:.0f} ex/s",
            f"{n * stored / dt / 1e9:.2f} GB/s")

    print("6. what a training step consumes (train step ~ 3 x forward FLOPs; H100 at an assumed 40% of 790 TFLOP/s)")
    for name, fwd in (("prior", prior), ("decoder 64 px", decoder), ("upsampler 64 -> 256, 64 px crops", super_res)):
        row(f"{name}: train step", f"{3 * fwd / 1e9:.0f} GFLOP/ex", f"{0.4 * 790e12 / (3 * fwd):.0f} ex/s per H100")
    row("embed job: both CLIP towers, forward", f"{(vision + text) / 1e9:.0f} GFLOP/ex",
        f"{0.4 * 790e12 / (vision + text):.0f} ex/s per H100")
    if args.json:
        Path(args.json).write_text(json.dumps([{"what": w, "value": v, "note": n} for w, v, n in ROWS], indent=2))


if __name__ == "__main__":
    main()
