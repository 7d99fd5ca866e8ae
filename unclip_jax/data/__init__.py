"""Data for training unCLIP: datasets from what users have on disk, CLIP embeddings, per-stage input pipelines.

    unclip-jax data build --source 'laion/{00000..00999}.tar' --out data/laion        # builders.py
    unclip-jax data embed --model kakaobrain/karlo-image-variations-diffusers \\
        --dataset data/laion                                                            # embed.py
    source = unclip_jax.data.make_source(config, "prior")                               # sources.py
    batch = next(source); state = source.get_state(); source.set_state(state)

| module | what |
|---|---|
| `readers.py` | folders with side-car captions or a captions table, webdataset tar shards, tfds datasets |
| `clean.py` | the bad-data rules: what is converted, what is skipped and why (`BuildReport`) |
| `builders.py` | the TFDS builder (ArrayRecord, no TensorFlow needed), `build_dataset`, `load_dataset` |
| `embed.py` | the resumable CLIP embedding job, `EmbeddingStore`, the prior's CLIP mean / std |
| `sampler.py` | host shards and memory-free per-epoch shuffles |
| `prefetch.py` | batches made ahead in threads from a pure function of the step |
| `sources.py` | prior / decoder / upsampler batches; `make_source(config, stage)` |
| `degrade.py` | random crops, blur and BSR-style degradation, one code path for numpy (host) and jax (device) |
"""

import importlib

# Loaded on first use, so that `unclip-jax sample` (which imports the CLI) never pays for tensorflow_datasets.
_EXPORTS = {
    "builders": ("build_dataset", "load_dataset", "load_report"),
    "clean": ("BuildReport", "CleanOptions"),
    "embed": ("EmbeddingStore", "compute_clip_stats", "embed_dataset", "load_clip_stats"),
    "sources": ("STAGES", "Source", "decoder_source", "make_source", "prior_source", "synthetic_source", "to_global",
                "upsampler_source"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"unclip_jax.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unclip_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
