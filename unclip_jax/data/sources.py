"""Training batches for each unCLIP stage: iterators of this host's part of every global batch.

    source = prior_source("data/laion", global_batch=2048, seed=0)    # or decoder_source, upsampler_source
    batch = next(source)                  # {name: np.ndarray}, leading dim global_batch // process_count
    state = source.get_state()            # JSON-serialisable, the same on every host: save it with the checkpoint
    source.set_state(state)               # the next batch is the one that followed when the state was taken

    source = make_source(config, "decoder")   # from an ml_collections.ConfigDict (keys in `make_source`)

Batches (B = global_batch // process_count, L = 77, D = 768 for Karlo):

    clip       pixel_values (B, P, P, 3) float32 (CLIPImageProcessor's output, NHWC), input_ids (B, L) int32,
               attention_mask (B, L) bool: the caption tokenized with the given CLIP tokenizer (no embeddings needed)
    prior      input_ids (B, L) int32, attention_mask (B, L) bool, text_embeds (B, D) float32,
               image_embeds (B, D) float32, [text_hidden_states (B, L, H) float32 when the embed job stored them]
    decoder    image (B, S, S, 3) float32 in [-1, 1] (shorter side resized to S, centre crop: the region CLIP saw),
               plus everything the prior gets
    upsampler  image (B, C, C, 3) float32 in [-1, 1]: random C x C crops of the image resized to the target size;
               [low_res (B, C/f, C/f, 3) when degrade_on="host"; otherwise the train step makes it on device
               with `unclip_jax.data.degrade.degrade_jax`]

Host p reads only its own shard (the examples of `tfds.even_splits(split, P)[p]`), shuffled anew every epoch
(`sampler`). Batch s is a pure function of (seed, s): crops and degradations draw from a generator seeded by
(seed, epoch, example index), so they do not depend on the number of hosts or on what was prefetched, and a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from unclip_jax.data import degrade
from unclip_jax.data.prefetch import Prefetcher, Workers, stack
from unclip_jax.data.sampler import Stream, host_range

STAGES = ("clip", "prior", "decoder", "upsampler")
_STAGE_IDS = {"prior": 1, "decoder": 2, "upsampler": 3, "clip": 4}
EMBEDDINGS_SUBDIR = "embeddings"


class Source:
    """An iterator of host batches with a resumable position (see the module docstring).

    `make_batch(indices, epochs)` turns the global example indices (B,) of one batch, and the epoch each belongs
    to, into the batch dict; it must be a pure function of its arguments.
    """

    def __init__(self, stage: str, stream: Stream, make_batch: Callable[[np.ndarray, np.ndarray], dict], *,
                 global_batch: int, process_count: int, num_examples: int, prefetch: int = 4,
                 resources: tuple = (), return_index: bool = False):
        self.stage, self.stream = stage, stream
        self.global_batch, self.process_count, self.num_examples = global_batch, process_count, num_examples
        self._make = make_batch
        self._resources = resources
        self._return_index = return_index
        self._step = 0
        self._pipeline = Prefetcher(self._batch, prefetch=prefetch)

    def _batch(self, step: int) -> dict:
        indices, epochs = self.stream.indices(step)
        batch = self._make(indices, epochs)
        if self._return_index:
            batch["index"] = indices
        return batch

    # -------------------------------------------------------------------------------- the protocol
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._pipeline.next()
        self._step += 1
        return batch

    def _fingerprint(self) -> dict:
        return {"stage": self.stage, "seed": self.stream.seed, "global_batch": self.global_batch,
                "process_count": self.process_count, "num_examples": self.num_examples}

    def get_state(self) -> dict:
        """{"step": batches returned so far, ...}: JSON-serialisable and identical on every host."""
        return {"step": self._step, **self._fingerprint(),
                "epoch": round(self.stream.epoch_of(self._step), 6)}  # informative only

    def set_state(self, state: dict) -> None:
        """Continues after the batch at which `state` was taken (from this run or an earlier one)."""
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k in state and state[k] != v}
        if diff:
            changes = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"the checkpoint's data position belongs to a different input pipeline ({changes}). "
                             "Resuming exactly needs the same dataset, seed, global batch and number of hosts; "
                             "to start this data afresh instead, skip set_state")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"step={step} in the data state; expected >= 0")
        self._step = step
        self._pipeline.reset(step)

    # -------------------------------------------------------------------------------- conveniences
    @property
    def batch_size(self) -> int:
        """Examples per host and step."""
        return self.stream.batch

    @property
    def steps_per_epoch(self) -> float:
        return self.stream.shard_size / self.stream.batch

    def close(self) -> None:
        self._pipeline.close()
        for r in self._resources:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------ images

def load_crop(data: bytes, *, scale_to: int, crop: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded image -> (crop, crop, 3) float32 in [-1, 1]: the image resized so its shorter side is `scale_to`,
    then a crop x crop window, centred (rng None) or uniformly random on the resized pixel grid.

    One antialiased bicubic resample of just the window (Pillow's box argument); JPEGs are first decoded at the
    smallest DCT scale that still covers `scale_to` (Pillow's draft: 1.7x faster for 64 px crops of 512 px photos).
    """
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        short = min(w, h)
        if im.format == "JPEG":
            im.draft("RGB", (math.ceil(w * scale_to / short), math.ceil(h * scale_to / short)))
        im = im.convert("RGB")
        # The window lies on the resized grid (round(w * scale_to / short) x ...); mapping it back through the
        # exact grid-to-image ratio per axis makes this the same as resizing the whole image, then cropping.
        grid_w, grid_h = max(crop, round(w * scale_to / short)), max(crop, round(h * scale_to / short))
        if rng is None:
            y, x = (grid_h - crop) / 2, (grid_w - crop) / 2
        else:
            y, x = degrade.random_crop_box(rng, grid_h, grid_w, crop)
        sx, sy = im.size[0] / grid_w, im.size[1] / grid_h
        box = (x * sx, y * sy, (x + crop) * sx, (y + crop) * sy)
        out = im.resize((crop, crop), Image.BICUBIC, box=box)
    return np.asarray(out, np.float32) / 127.5 - 1.0


def _read(images, local: np.ndarray, pool: Workers, chunk: int = 16) -> list:
    """The records at `local` indices, read in chunks on the worker threads (ArrayRecord reads and tfds' parsing
    of one record cost about a millisecond of host time: in one thread, that capped a GPU step at ~1000
    examples/s)."""
    local = local.tolist()
    if pool.workers == 1 or len(local) <= chunk:
        return images.__getitems__(local)
    parts = pool.map(images.__getitems__, [local[i:i + chunk] for i in range(0, len(local), chunk)])
    return [r for part in parts for r in part]


def _example_rng(seed: int, stage: str, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STAGE_IDS[stage], int(epoch), int(index)])


# ------------------------------------------------------------------------------------------------ builders

def _host(global_batch: int, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} must be a positive multiple of the number of hosts "
                         f"({process_count}): every host reads global_batch / hosts examples per step")
    return process_index, process_count, global_batch // process_count


def _embeddings(dataset_dir, embeddings):
    from unclip_jax.data.embed import EmbeddingStore
    path = Path(embeddings) if embeddings else Path(dataset_dir) / EMBEDDINGS_SUBDIR
    return EmbeddingStore(path)


def _store_fields(store, hidden_states: bool | None) -> list[str]:
    fields = ["input_ids", "attention_mask", "text_embeds", "image_embeds"]
    if hidden_states is None:
        hidden_states = store.has_hidden_states
    if hidden_states:
        if not store.has_hidden_states:
            raise ValueError(f"{store.path} has no text_hidden_states: embed with --store-hidden-states, or let "
                             "the train step recompute them from input_ids (hidden_states=False)")
        fields.append("text_hidden_states")
    return fields


def _as_batch(rows: dict) -> dict:
    out = {}
    for k, v in rows.items():
        if k == "input_ids":
            out[k] = v.astype(np.int32)
        elif k == "attention_mask":
            out[k] = v.astype(bool)
        else:
            out[k] = v.astype(np.float32)
    return out


def _image_source(dataset_dir, split: str, process_index: int, process_count: int):
    import tensorflow_datasets as tfds

    from unclip_jax.data.builders import load_dataset
    builder = load_dataset(dataset_dir)
    if split not in builder.info.splits:
        raise ValueError(f"{dataset_dir} has no split {split!r}; it has {list(builder.info.splits)}")
    n = builder.info.splits[split].num_examples
    source = builder.as_data_source(split=tfds.even_splits(split, process_count)[process_index],
                                    decoders={"image": tfds.decode.SkipDecoding()})
    return source, n


def prior_source(dataset_dir: str | os.PathLike, *, global_batch: int, seed: int = 0, embeddings=None,
                 hidden_states: bool | None = None, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 4, return_index: bool = False) -> Source:
    """Prior batches (embeddings and tokens only; no image is decoded). embeddings: the embed job's folder
    (default <dataset_dir>/embeddings); hidden_states: include stored text_hidden_states (default: if stored)."""
    process_index, process_count, per_host = _host(global_batch, process_index, process_count)
    store = _embeddings(dataset_dir, embeddings)
    fields = _store_fields(store, hidden_states)
    start, end = host_range(store.num_examples, process_index, process_count)
    stream = Stream(start, end, per_host, seed, process_index=process_index)
    return Source("prior", stream, lambda idx, ep: _as_batch(store.gather(idx, fields)), global_batch=global_batch,
                  process_count=process_count, num_examples=store.num_examples, prefetch=prefetch,
                  return_index=return_index)


def decoder_source(dataset_dir: str | os.PathLike, *, global_batch: int, seed: int = 0, image_size: int = 64,
                   crop: str = "center", embeddings=None, hidden_states: bool | None = None, split: str = "train",
                   process_index: int | None = None, process_count: int | None = None, workers: int | None = None,
                   prefetch: int = 4, return_index: bool = False) -> Source:
    """Decoder batches: the image at image_size (centre crop, or "random" crops along the longer side) with its
    stored CLIP embeddings and tokens."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop={crop!r}; expected 'center' (the region CLIP embedded) or 'random'")
    process_index, process_count, per_host = _host(global_batch, process_index, process_count)
    store = _embeddings(dataset_dir, embeddings)
    fields = _store_fields(store, hidden_states)
    images, n = _image_source(dataset_dir, split, process_index, process_count)
    if n != store.num_examples:
        raise ValueError(f"{store.path} holds {store.num_examples} embeddings but {dataset_dir} has {n} examples: "
                         "embed this dataset (again)")
    start, end = host_range(n, process_index, process_count)
    stream = Stream(start, end, per_host, seed, process_index=process_index)
    pool = Workers(workers)

    def one(args):
        record, index, epoch = args
        rng = _example_rng(seed, "decoder", epoch, index) if crop == "random" else None
        return load_crop(record["image"], scale_to=image_size, crop=image_size, rng=rng)

    def make(idx, epochs):
        records = _read(images, idx - start, pool)
        batch = {"image": np.stack(pool.map(one, zip(records, idx, epochs)))}
        batch.update(_as_batch(store.gather(idx, fields)))
        return batch

    return Source("decoder", stream, make, global_batch=global_batch, process_count=process_count, num_examples=n,
                  prefetch=prefetch, resources=(pool,), return_index=return_index)


def clip_source(dataset_dir: str | os.PathLike, *, global_batch: int, tokenizer: str | os.PathLike,
                image_size: int = 224, text_len: int = 77, seed: int = 0, split: str = "train",
                process_index: int | None = None, process_count: int | None = None, workers: int | None = None,
                prefetch: int = 4, return_index: bool = False) -> Source:
    """Batches for training a CLIP contrastively: images preprocessed exactly as `unclip-jax data embed` and the
    pipelines will (a CLIPImageProcessor resizing to image_size with CLIP's mean and std) and the captions
    tokenized with `tokenizer` (a CLIP tokenizer folder), padded / truncated to text_len."""
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    from unclip_jax.data.embed import clip_pixels, tokenize
    from unclip_jax.training.stages import CLIP_MEAN, CLIP_STD
    process_index, process_count, per_host = _host(global_batch, process_index, process_count)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer))
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size},
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    images, n = _image_source(dataset_dir, split, process_index, process_count)
    start, end = host_range(n, process_index, process_count)
    stream = Stream(start, end, per_host, seed, process_index=process_index)
    pool = Workers(workers)

    def make(idx, epochs):
        records = _read(images, idx - start, pool)
        pixels = np.stack(pool.map(lambda r: clip_pixels(processor, r["image"]), records))
        captions = [r["caption"].decode() if isinstance(r["caption"], bytes) else str(r["caption"]) for r in records]
        ids, mask, _ = tokenize(tok, captions, text_len)
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}

    return Source("clip", stream, make, global_batch=global_batch, process_count=process_count, num_examples=n,
                  prefetch=prefetch, resources=(pool,), return_index=return_index)


def upsampler_source(dataset_dir: str | os.PathLike, *, global_batch: int, seed: int = 0, target_size: int = 256,
                     crop_size: int | None = None, low_res_factor: int = 4, degrade_kind: str = "blur",
                     degrade_on: str = "device", split: str = "train", process_index: int | None = None,
                     process_count: int | None = None, workers: int | None = None, prefetch: int = 4,
                     return_index: bool = False) -> Source:
    """Upsampler batches: random crop_size crops (default target_size // 4, paper section 2) of the image resized
    to target_size; with degrade_on="host" also `low_res`, degraded with `degrade_kind` ("blur" for 64 -> 256,
    "bsr" for 256 -> 1024) and reduced by low_res_factor."""
    crop_size = crop_size or target_size // 4
    if degrade_on not in ("device", "host"):
        raise ValueError(f"degrade_on={degrade_on!r}; expected 'device' or 'host'")
    if degrade_kind not in degrade.KINDS:
        raise ValueError(f"degrade_kind={degrade_kind!r}; expected one of {degrade.KINDS}")
    if crop_size > target_size or crop_size % low_res_factor:
        raise ValueError(f"crop_size={crop_size} must be at most target_size={target_size} and a multiple of "
                         f"low_res_factor={low_res_factor}")
    process_index, process_count, per_host = _host(global_batch, process_index, process_count)
    images, n = _image_source(dataset_dir, split, process_index, process_count)
    start, end = host_range(n, process_index, process_count)
    stream = Stream(start, end, per_host, seed, process_index=process_index)
    pool = Workers(workers)

    def one(args):
        record, index, epoch = args
        rng = _example_rng(seed, "upsampler", epoch, index)
        image = load_crop(record["image"], scale_to=target_size, crop=crop_size, rng=rng)
        out = {"image": image}
        if degrade_on == "host":
            out["low_res"] = degrade.degrade_np(rng, image[None], kind=degrade_kind, factor=low_res_factor)[0]
        return out

    def make(idx, epochs):
        records = _read(images, idx - start, pool)
        return stack(pool.map(one, zip(records, idx, epochs)))

    return Source("upsampler", stream, make, global_batch=global_batch, process_count=process_count,
                  num_examples=n, prefetch=prefetch, resources=(pool,), return_index=return_index)


def synthetic_source(stage: str, *, global_batch: int, seed: int = 0, num_examples: int = 1 << 20,
                     embed_dim: int = 768, text_len: int = 77, hidden_dim: int | None = None, vocab_size: int = 49408,
                     hidden_states: bool = False, image_size: int = 64, target_size: int = 256,
                     crop_size: int | None = None, low_res_factor: int = 4, degrade_on: str = "device",
                     process_index: int | None = None, process_count: int | None = None, prefetch: int = 2,
                     return_index: bool = False) -> Source:
    """Random batches of the right shapes and dtypes, deterministic per example: for smoke tests and for
    timing the train step without any input cost."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; expected one of {STAGES}")
    process_index, process_count, per_host = _host(global_batch, process_index, process_count)
    start, end = host_range(num_examples, process_index, process_count)
    stream = Stream(start, end, per_host, seed, process_index=process_index)
    crop_size = crop_size or target_size // 4

    def one(index, epoch):
        rng = _example_rng(seed, stage, 0, index)
        if stage == "upsampler":
            out = {"image": rng.uniform(-1, 1, (crop_size, crop_size, 3)).astype(np.float32)}
            if degrade_on == "host":
                out["low_res"] = degrade.apply(np, out["image"][None], {}, kind="none", factor=low_res_factor)[0]
            return out
        length = int(rng.integers(2, text_len + 1))
        ids = np.zeros(text_len, np.int32)
        ids[:length] = rng.integers(1, vocab_size, length)
        out = {"input_ids": ids, "attention_mask": np.arange(text_len) < length,
               "text_embeds": rng.standard_normal(embed_dim).astype(np.float32),
               "image_embeds": rng.standard_normal(embed_dim).astype(np.float32)}
        if hidden_states:
            out["text_hidden_states"] = rng.standard_normal((text_len, hidden_dim or embed_dim)).astype(np.float32)
        if stage == "decoder":
            out["image"] = rng.uniform(-1, 1, (image_size, image_size, 3)).astype(np.float32)
        return out

    return Source(stage, stream, lambda idx, ep: stack([one(i, e) for i, e in zip(idx, ep)]),
                  global_batch=global_batch, process_count=process_count, num_examples=num_examples,
                  prefetch=prefetch, return_index=return_index)


# ------------------------------------------------------------------------------------------------ config

def _get(cfg, key: str, default=None):
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def make_source(config, stage: str | None = None, *, process_index: int | None = None,
                process_count: int | None = None) -> Source:
    """The source for `stage` from a config (an ml_collections.ConfigDict, or anything with .get / attributes).

    stage: "prior", "decoder", "upsampler" (64 -> 256) or "upsampler_1024" (256 -> 1024; BSR by default);
    "super_res_first" / "super_res_last" mean "upsampler". Default: config.stage.

    config.data is either a string, "synthetic" or the dataset folder, or a ConfigDict with the keys below. Each
    data key falls back to the trainer's flat key in brackets, then to the default:

        config.batch_size            global batch, all hosts together                              (required)
        config.seed                  data order, crops and degradations                             (0)
        config.data.kind             "tfds" (a dataset from `unclip-jax data build`) | "synthetic"  ("tfds")
        config.data.dir              the built dataset: data build's --out                   (required for tfds)
        config.data.embeddings       the embed job's --out                           (<data.dir>/embeddings)
        config.data.split            "train"
        config.data.hidden_states    include stored text_hidden_states     (tfds: when stored; synthetic:
                                     [data_text_hidden_states] or False)
        config.data.workers          decoding threads per host                       (CPU count + 2, max 32)
        config.data.prefetch         batches made ahead                                              (4)
      decoder:
        config.data.image_size       S                                                  [image_size] (64)
        config.data.crop             "center" (the region CLIP embedded) | "random"             ("center")
      clip:
        config.data.tokenizer        the CLIP tokenizer folder captions are tokenized with            [tokenizer]
        config.data.clip_image_size  P, the image tower's input                          [clip_image_size] (224)
      upsamplers:
        config.data.crop_size        training crop C                           [crop_size] (64; 256 for _1024)
        config.data.target_size      the size the image is resized to before cropping [target_size] (4 x crop_size)
        config.data.low_res_factor   f                                              [upsample_factor] (4)
        config.data.degrade          "blur" | "bsr" | "none"                 [degradation] (blur; bsr for _1024)
        config.data.degrade_on       "device": the train step degrades; "host": batch["low_res"]   ("device")
      synthetic:
        config.data.embed_dim [clip_dim] (768), text_len [text_length] (77), vocab_size [vocab_size] (49408),
        hidden_dim [text_hidden_dim], num_examples (2**20)
    """
    stage = stage or _get(config, "stage")
    if not stage:
        raise ValueError("no stage: pass one, or set config.stage")
    is_1024 = stage == "upsampler_1024"
    stage = "upsampler" if stage.startswith(("upsampler", "super_res")) else stage
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; expected clip, prior, decoder, upsampler, upsampler_1024 or super_res_*")
    data = _get(config, "data")
    if data is None:
        raise ValueError("config.data is missing: the built dataset's folder, 'synthetic', or a ConfigDict with "
                         "dir (and kind, embeddings, ...)")
    table = None if isinstance(data, (str, os.PathLike)) else data
    kind = ("synthetic" if str(data) == "synthetic" else "tfds") if table is None else _get(table, "kind", "tfds")
    directory = str(data) if table is None else _get(table, "dir")
    global_batch = _get(config, "batch_size")
    if global_batch is None:
        raise ValueError("config.batch_size (the global batch) is missing")

    def key(name, flat=None, default=None):
        value = _get(table, name)
        if value is None and flat is not None:
            value = _get(config, flat)
        return default if value is None else value

    crop_size = key("crop_size", "crop_size", 256 if is_1024 else 64)
    kwargs = dict(
        global_batch=int(global_batch), seed=int(_get(config, "seed", 0)), process_index=process_index,
        process_count=process_count, embeddings=key("embeddings"), split=key("split"), workers=key("workers"),
        prefetch=key("prefetch"), image_size=key("image_size", "image_size"), crop=key("crop"), crop_size=crop_size,
        target_size=key("target_size", "target_size", 4 * crop_size), low_res_factor=key("low_res_factor", "upsample_factor"),
        degrade_kind=key("degrade", "degradation", "bsr" if is_1024 else None), degrade_on=key("degrade_on"),
        embed_dim=key("embed_dim", "clip_dim"), text_len=key("text_len", "text_length"),
        vocab_size=key("vocab_size", "vocab_size"), hidden_dim=key("hidden_dim", "text_hidden_dim"),
        num_examples=key("num_examples"), tokenizer=key("tokenizer", "tokenizer"),
        clip_image_size=key("clip_image_size", "clip_image_size"))
    if kind == "synthetic":
        if stage == "clip":
            raise ValueError("the data pipeline has no synthetic clip source; use the trainer's config.data = "
                             "'synthetic' (unclip_jax.training.data.SyntheticData)")
        kwargs["hidden_states"] = bool(key("hidden_states", "data_text_hidden_states", False))
        return synthetic_source(stage, **_accepted(synthetic_source, kwargs))
    if kind != "tfds":
        raise ValueError(f"config.data.kind={kind!r}; expected 'tfds' or 'synthetic'")
    if not directory:
        raise ValueError("config.data.dir is missing: the folder `unclip-jax data build --out` wrote")
    kwargs["hidden_states"] = key("hidden_states")
    if stage == "clip":
        if not kwargs["tokenizer"]:
            raise ValueError("the clip source tokenizes captions: set config.tokenizer (a CLIP tokenizer folder)")
        kwargs["image_size"] = kwargs.pop("clip_image_size")
    fn = {"clip": clip_source, "prior": prior_source, "decoder": decoder_source, "upsampler": upsampler_source}[stage]
    return fn(directory, **_accepted(fn, kwargs))


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments `fn` takes that are set (config keys of the other stages are ignored)."""
    import inspect
    names = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in names and v is not None}


def to_global(batch: dict, sharding) -> dict:
    """This host's batch -> global jax Arrays, every leading dim split by `sharding` (e.g.
    NamedSharding(mesh, P("data"))): `jax.make_array_from_process_local_data` on each entry."""
    import jax
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
