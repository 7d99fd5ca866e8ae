"""`unclip-jax data build | embed`: prepare a dataset, then its CLIP embeddings.

    unclip-jax data build --source photos/ --out data/photos                      # images + side-car .txt
    unclip-jax data build --source photos/ --captions captions.csv --out data/photos
    unclip-jax data build --source 'laion/{00000..00999}.tar' --out data/laion --min-size 256
    unclip-jax data build --source tfds:coco_captions --caption-key captions/text --all-captions --out data/coco
    unclip-jax data embed --model kakaobrain/karlo-image-variations-diffusers --dataset data/laion \\
        --out data/laion/embeddings --dtype bf16

(`python -m unclip_jax.data.cli ...` runs the same commands.)
"""

from __future__ import annotations

import argparse
import sys


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Adds `data` (with `build` and `embed`) to an argparse subparsers object; returns the `data` parser."""
    data = subparsers.add_parser("data", help="build a dataset from images and captions, embed it with CLIP",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="data_command", required=True)

    b = sub.add_parser("build", help="images + captions on disk -> a TFDS dataset, skips counted and reported")
    b.add_argument("--source", required=True,
                   help="a folder of images (side-car .txt/.json captions, or --captions), webdataset .tar shards "
                        "('dir/{00000..00099}.tar', a glob, or a folder of them), or tfds:NAME / tfds:/path")
    b.add_argument("--out", required=True, help="folder for the dataset (and build_report.json)")
    b.add_argument("--captions", help="CSV / TSV / JSONL table of image paths and captions (folder sources)")
    b.add_argument("--image-column", help="the table's image path column (default: file_name, image, path, ...)")
    b.add_argument("--caption-column", help="the table's caption column (default: caption, text, prompt, ...)")
    b.add_argument("--min-size", type=int, default=64, help="skip images whose shorter side is smaller (px)")
    b.add_argument("--max-size", type=int, default=None,
                   help="shrink images whose shorter side is larger to this (px); default: keep the originals")
    b.add_argument("--max-aspect", type=float, default=None, help="skip images longer than this x their width")
    b.add_argument("--workers", type=int, default=None, help="image decoding threads")
    b.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    b.add_argument("--split", default=None, help="tfds sources: the split to read (train)")
    b.add_argument("--tfds-data-dir", default=None, help="tfds sources: where the prepared dataset lives")
    b.add_argument("--image-key", default=None, help="tfds sources: the image feature (image)")
    b.add_argument("--caption-key", default=None,
                   help="tfds sources: the caption feature, '/' for nested ones (caption; coco: captions/text)")
    b.add_argument("--all-captions", action="store_true",
                   help="tfds sources with several captions per image: one example per caption (default: first)")

    e = sub.add_parser("embed", help="CLIP image and text embeddings and tokens of a built dataset (resumable)")
    e.add_argument("--model", required=True, help="diffusers unCLIP folder / hub id with text_encoder and tokenizer")
    e.add_argument("--image-model", default=None,
                   help="where the image tower comes from, if not --model (Karlo's text-to-image folder has none)")
    e.add_argument("--dataset", required=True, help="the folder `data build --out` wrote")
    e.add_argument("--out", default=None, help="folder for the embeddings (default: DATASET/embeddings)")
    e.add_argument("--split", default="train")
    e.add_argument("--batch-size", type=int, default=256, help="per process, split over its devices")
    e.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype of the towers")
    e.add_argument("--store-hidden-states", action="store_true",
                   help="also store the text tower's hidden states (L x H fp16 per example) instead of "
                        "recomputing them in the train step")
    e.add_argument("--workers", type=int, default=None, help="image preprocessing threads")
    e.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (run again to resume)")
    e.add_argument("--compilation-cache", default=None, metavar="DIR", help="persistent XLA compilation cache")
    return data


def run(args: argparse.Namespace) -> int:
    """Runs a parsed `data` command; returns the exit status."""
    if args.data_command == "build":
        from unclip_jax.data.builders import build_dataset
        from unclip_jax.data.clean import CleanOptions
        options = CleanOptions(min_size=args.min_size, max_size=args.max_size, max_aspect=args.max_aspect)
        build_dataset(args.source, args.out, options=options, workers=args.workers, overwrite=args.overwrite,
                      captions=args.captions, image_column=args.image_column, caption_column=args.caption_column,
                      split=args.split, data_dir=args.tfds_data_dir, image_key=args.image_key,
                      caption_key=args.caption_key, all_captions=args.all_captions or None)
        return 0
    if args.data_command == "embed":
        from pathlib import Path

        from unclip_jax.data.embed import embed_dataset
        if args.compilation_cache:
            from unclip_jax import enable_compilation_cache
            enable_compilation_cache(args.compilation_cache)
        out = args.out or str(Path(args.dataset) / "embeddings")
        r = embed_dataset(args.model, args.dataset, out, image_model=args.image_model, split=args.split,
                          batch_size=args.batch_size, dtype=args.dtype, store_hidden_states=args.store_hidden_states,
                          workers=args.workers, max_batches=args.max_batches)
        rate = r.done_now / r.seconds if r.seconds else 0.0
        print(f"{r.part}: {r.done_now} example(s) embedded in {r.seconds:.1f} s ({rate:.1f} ex/s); "
              f"{'complete' if r.complete else 'incomplete: run the same command again to continue'}"
              f"{f'; {r.truncated} caption(s) truncated to the tokenizer length' if r.truncated else ''}")
        if r.stats:
            print(f"CLIP statistics for the prior's normalisation written to {Path(out) / 'clip_stats.json'}")
        return 0
    raise ValueError(f"unknown data command {args.data_command!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unclip-jax")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
