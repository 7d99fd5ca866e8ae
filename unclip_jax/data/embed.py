"""`unclip-jax data embed`: the CLIP towers over a built dataset, stored for the prior and the decoder.

    result = embed_dataset("kakaobrain/karlo-image-variations-diffusers", "data/laion", "data/laion/embeddings")
    store = EmbeddingStore("data/laion/embeddings")     # store.gather(indices) -> dict of arrays
    stats = load_clip_stats("data/laion/embeddings")    # the prior's clip_mean / clip_std, (1, D) each

Per example, aligned with the dataset's index:

    image_embeds        (D,)    float32   CLIP image embedding z_i (vision tower, CLIPImageProcessor preprocessing)
    text_embeds         (D,)    float32   CLIP text embedding z_t (projected pooled token)
    input_ids           (L,)    int32     tokens, padded / truncated to L = 77 as the pipelines tokenize
    attention_mask      (L,)    bool
    text_hidden_states  (L, H)  float16   only with store_hidden_states: 118 KB per example at Karlo's size
                                          (77 x 768), so by default the train step recomputes them from the
                                          tokens (see benchmarks/DATA.md for the measured trade-off)

Layout: `meta.json`, one `part-PPPPP-of-NNNNN/` per process (each process embeds its own contiguous shard, on all
its local devices) holding one .npy per field and `progress.json`, and `clip_stats.json` once every part is done.
The job writes in order and records how many examples are done after each batch, so an interrupted job run again
with the same arguments continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.data.builders import dataset_dir, load_dataset
from unclip_jax.data.prefetch import Prefetcher, Workers
from unclip_jax.data.sampler import host_range

FORMAT_VERSION = 1
META_FILE, PROGRESS_FILE, STATS_FILE = "meta.json", "progress.json", "clip_stats.json"
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


# ------------------------------------------------------------------------------------------------ model

@dataclasses.dataclass
class ClipTowers:
    """The frozen CLIP text and image towers with their tokenizer and image processor."""
    text: Any
    text_params: Any
    image: Any
    image_params: Any
    tokenizer: Any
    processor: Any
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    def encoder(self, hidden_states: bool):
        """The jitted encode function (cached: a resumed or repeated job in the same process does not recompile)."""
        import jax
        if hidden_states not in self._compiled:
            self._compiled[hidden_states] = jax.jit(encode_fn(self, hidden_states=hidden_states))
        return self._compiled[hidden_states]

    @property
    def text_len(self) -> int:
        return self.text.config.max_position_embeddings

    @property
    def embed_dim(self) -> int:
        return self.text.config.projection_dim

    @property
    def hidden_dim(self) -> int:
        return self.text.config.hidden_size


def _find(root: Path, sub: str, *markers: str) -> Path | None:
    for p in (root / sub, root):
        if any((p / m).exists() for m in markers):
            return p
    return None


def load_towers(model: str, *, image_model: str | None = None, dtype: str = "float32") -> ClipTowers:
    """Text tower, tokenizer from `model`; image tower and processor from `image_model` (default: `model`).

    model: a diffusers unCLIP folder or hub id with text_encoder/ and tokenizer/ (and image_encoder/,
    feature_extractor/ for the image side, as karlo-image-variations-diffusers has), or a transformers CLIP folder.
    """
    import jax.numpy as jnp
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    from unclip_jax.convert import CheckpointError, load_component
    from unclip_jax.convert.io import resolve_folder

    compute = jnp.dtype(DTYPES.get(dtype, dtype))
    image_model = image_model or model
    text, text_params = load_component(model, "text_encoder", dtype=compute)
    try:
        image, image_params = load_component(image_model, "image_encoder", dtype=compute)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n{image_model} has no CLIP image tower: Karlo's text-to-image folder has none; "
                              "pass --image-model kakaobrain/karlo-image-variations-diffusers (the same ViT-L/14) "
                              "or openai/clip-vit-large-patch14") from None
    root = resolve_folder(model, None, patterns=("*.json", "*.txt"))
    tok_dir = _find(root, "tokenizer", "tokenizer.json", "vocab.json")
    if tok_dir is None:
        raise CheckpointError(f"{root} has no CLIP tokenizer (tokenizer/ with tokenizer.json, or vocab.json and "
                              "merges.txt)")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    image_root = resolve_folder(image_model, None, patterns=("*.json", "*.txt"))
    fe_dir = _find(image_root, "feature_extractor", "preprocessor_config.json")
    size = image.config.image_size
    processor = (CLIPImageProcessorPil.from_pretrained(str(fe_dir)) if fe_dir else
                 CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    crop = processor.crop_size
    if (crop["height"], crop["width"]) != (size, size):
        raise CheckpointError(f"{fe_dir}: the image processor crops to {crop}, but the image tower takes {size} px")
    return ClipTowers(text, text_params, image, image_params, tokenizer, processor)


def tokenize(tokenizer, captions: list[str], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Captions -> (input_ids (B, L) int32, attention_mask (B, L) bool, truncated (B,) bool).

    The same ids and mask as tokenizer(..., padding="max_length", max_length=L, truncation=True): a longer
    caption keeps its first L - 1 tokens and its end token.
    """
    ids = np.full((len(captions), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(captions), length), bool)
    truncated = np.zeros(len(captions), bool)
    for i, seq in enumerate(tokenizer(list(captions), truncation=False)["input_ids"]):
        if len(seq) > length:
            seq = list(seq[:length - 1]) + [seq[-1]]
            truncated[i] = True
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = True
    return ids, mask, truncated


def _standard(processor) -> bool:
    """A CLIP processor that resizes the shorter side, centre-crops, rescales and normalises (every CLIP's)."""
    size = getattr(processor, "size", None) or {}
    return (all(getattr(processor, k, False) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"))
            and set(size) == {"shortest_edge"} and getattr(processor, "crop_size", None) is not None)


def clip_pixels(processor, data: bytes) -> np.ndarray:
    """Encoded image -> (S, S, 3) float32 NHWC pixel values, as the CLIP image processor makes them.

    For the standard CLIP preprocessing the same arithmetic runs here directly (the same Pillow resize, crop
    offsets, rescale and normalisation; equal to the processor's output to float32 rounding, tested), about
    4x faster and mostly outside the GIL, so input threads scale; any other processor is called as it is."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
    if _standard(processor):
        short = processor.size["shortest_edge"]
        ch, cw = processor.crop_size["height"], processor.crop_size["width"]
        w, h = im.size
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        top, left = int((nh - ch) / 2), int((nw - cw) / 2)
    if not _standard(processor) or top < 0 or left < 0:  # (a crop larger than the resized image: it pads)
        pixels = processor(images=[im], return_tensors="np").pixel_values[0]
        return np.ascontiguousarray(pixels.transpose(1, 2, 0), np.float32)
    a = np.asarray(im.resize((nw, nh), processor.resample), np.float32)
    a = a[top:top + ch, left:left + cw] * np.float32(processor.rescale_factor)
    mean, std = np.asarray(processor.image_mean, np.float32), np.asarray(processor.image_std, np.float32)
    return np.ascontiguousarray((a - mean) / std, np.float32)


def encode_fn(towers: ClipTowers, *, hidden_states: bool):
    """(text_params, image_params, input_ids, mask, pixels) -> dict of per-example outputs (not jitted)."""
    import jax.numpy as jnp

    def encode(text_params, image_params, input_ids, attention_mask, pixels):
        t = towers.text.apply({"params": text_params}, input_ids, attention_mask)
        i = towers.image.apply({"params": image_params}, pixels)
        out = {"image_embeds": i.image_embeds.astype(jnp.float32), "text_embeds": t.text_embeds.astype(jnp.float32)}
        if hidden_states:
            out["text_hidden_states"] = t.last_hidden_state.astype(jnp.float16)
        return out
    return encode


# ------------------------------------------------------------------------------------------------ storage

def _fields(d: int, length: int, hidden: int, store_hidden: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    f = {"image_embeds": ((d,), "float32"), "text_embeds": ((d,), "float32"), "input_ids": ((length,), "int32"),
         "attention_mask": ((length,), "bool")}
    if store_hidden:
        f["text_hidden_states"] = ((length, hidden), "float16")
    return f


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def dataset_fingerprint(dataset) -> str:
    """A hash of the dataset's dataset_info.json (its splits, shard lengths, features)."""
    return hashlib.sha1((dataset_dir(dataset) / "dataset_info.json").read_bytes()).hexdigest()[:16]


def _part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


class EmbeddingStore:
    """Reads a finished embed job's output: `gather(global indices)` -> {field: (len(indices), ...) array}."""

    def __init__(self, path: str | os.PathLike, *, require_complete: bool = True):
        self.path = Path(path)
        if not (self.path / META_FILE).exists():
            raise FileNotFoundError(f"{self.path} holds no embeddings (no {META_FILE}); run "
                                    "`unclip-jax data embed --model ... --dataset ... --out "
                                    f"{self.path}` first")
        self.meta = json.loads((self.path / META_FILE).read_text())
        count = self.meta["process_count"]
        self.num_examples = self.meta["num_examples"]
        self.starts, self.parts = [], []
        for p in range(count):
            folder = self.path / _part_name(p, count)
            start, end = host_range(self.num_examples, p, count)
            progress = json.loads((folder / PROGRESS_FILE).read_text()) if (folder / PROGRESS_FILE).exists() else {}
            if require_complete and progress.get("done", 0) < end - start:
                raise ValueError(f"{folder} is incomplete ({progress.get('done', 0)} of {end - start} examples): "
                                 "run the same `unclip-jax data embed` command again to finish it")
            self.starts.append(start)
            self.parts.append({k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in self.fields})
        self.starts = np.asarray(self.starts, np.int64)

    @property
    def fields(self) -> list[str]:
        return list(self.meta["fields"])

    @property
    def embed_dim(self) -> int:
        return self.meta["embed_dim"]

    @property
    def text_len(self) -> int:
        return self.meta["text_len"]

    @property
    def has_hidden_states(self) -> bool:
        return "text_hidden_states" in self.meta["fields"]

    def gather(self, indices, fields=None) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        fields = list(fields or self.fields)
        part = np.searchsorted(self.starts, indices, side="right") - 1
        out = {}
        for k in fields:
            shape, dtype = self.meta["fields"][k]
            a = np.empty((len(indices), *shape), dtype)
            for p in np.unique(part):
                sel = part == p
                local = indices[sel] - self.starts[p]
                order = np.argsort(local, kind="stable")  # sorted reads: sequential pages
                rows = np.empty((len(local), *shape), dtype)
                rows[order] = self.parts[p][k][local[order]]
                a[sel] = rows
            out[k] = a
        return out


# ------------------------------------------------------------------------------------------------ the job

@dataclasses.dataclass
class EmbedResult:
    out: Path
    part: str
    part_examples: int     # examples in this process's part
    done_now: int          # examples embedded by this call
    truncated: int         # captions longer than L tokens in this part (kept, truncated), over all calls
    seconds: float
    complete: bool         # this part is finished
    stats: dict | None     # clip_stats.json's content, once every part is finished


def embed_dataset(model: str, dataset: str | os.PathLike, out: str | os.PathLike, *, image_model: str | None = None,
                  split: str = "train", batch_size: int = 256, dtype: str = "float32",
                  store_hidden_states: bool = False, workers: int | None = None, prefetch: int = 4,
                  process_index: int | None = None, process_count: int | None = None,
                  max_batches: int | None = None, progress: bool = True, towers: ClipTowers | None = None
                  ) -> EmbedResult:
    """Embeds this process's shard of `dataset` into `out` (resuming a previous run there); see the module doc.

    batch_size: per process, split over its local devices (rounded up to a multiple of their number);
    dtype: compute dtype of the towers, "float32" or "bfloat16" (outputs are stored as float32 either way);
    max_batches: stop after that many batches (a time-limited job; run again to continue).
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    builder = load_dataset(dataset)
    n = builder.info.splits[split].num_examples
    start, end = host_range(n, process_index, process_count)
    towers = towers or load_towers(model, image_model=image_model, dtype=dtype)
    fields = _fields(towers.embed_dim, towers.text_len, towers.hidden_dim, store_hidden_states)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "model": str(model), "image_model": str(image_model or model),
            "dtype": DTYPES.get(dtype, dtype), "dataset": str(dataset_dir(dataset)),
            "dataset_fingerprint": dataset_fingerprint(dataset), "split": split, "num_examples": n,
            "process_count": process_count, "embed_dim": towers.embed_dim, "text_len": towers.text_len,
            "fields": {k: [list(s), d] for k, (s, d) in fields.items()}}
    _check_or_write_meta(out / META_FILE, meta)

    folder = out / _part_name(process_index, process_count)
    folder.mkdir(exist_ok=True)
    state = json.loads((folder / PROGRESS_FILE).read_text()) if (folder / PROGRESS_FILE).exists() else \
        {"done": 0, "truncated": 0}
    total = end - start
    arrays = {k: np.lib.format.open_memmap(folder / f"{k}.npy", mode="r+" if state["done"] else "w+",
                                           dtype=np.dtype(d), shape=(total, *s)) for k, (s, d) in fields.items()}
    if not state["done"]:
        _write_json(folder / PROGRESS_FILE, state)

    devices = jax.local_devices()
    batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    batch_sharding, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    encode = towers.encoder(store_hidden_states)
    text_params = jax.device_put(towers.text_params, replicated)
    image_params = jax.device_put(towers.image_params, replicated)

    import tensorflow_datasets as tfds
    source = builder.as_data_source(split=tfds.even_splits(split, process_count)[process_index],
                                    decoders={"image": tfds.decode.SkipDecoding()})
    if len(source) != total:
        raise RuntimeError(f"tfds.even_splits gives {len(source)} examples to process {process_index}, "
                           f"expected {total}")
    pool = Workers(workers)
    first = state["done"]
    num_batches = -(-(total - first) // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)

    def make_inputs(b: int):
        lo = first + b * batch_size
        hi = min(lo + batch_size, total)
        records = source.__getitems__(list(range(lo, hi)))
        captions = [r["caption"].decode("utf-8") for r in records]
        ids, mask, truncated = tokenize(towers.tokenizer, captions, towers.text_len)
        pixels = np.stack(pool.map(lambda r: clip_pixels(towers.processor, r["image"]), records))
        pad = batch_size - (hi - lo)
        if pad:  # a full batch every time: one compiled shape
            ids, mask, pixels = (np.concatenate([x, np.repeat(x[-1:], pad, 0)]) for x in (ids, mask, pixels))
        return lo, hi, ids, mask, pixels, int(truncated.sum())

    pipeline = Prefetcher(make_inputs, prefetch=prefetch) if num_batches else None
    bar = tqdm(total=total, initial=first, unit="ex", desc=f"embedding {folder.name}", disable=not progress)
    done_now = 0

    def finish(lo, hi, ids, mask, outputs, truncated):
        nonlocal state, done_now
        rows = {"input_ids": ids, "attention_mask": mask, **jax.device_get(outputs)}
        _write_rows(arrays, rows, lo, hi)
        state = {"done": hi, "truncated": state["truncated"] + truncated}
        _write_json(folder / PROGRESS_FILE, state)  # after the rows are on disk: a crash redoes, never skips
        done_now += hi - lo
        bar.update(hi - lo)

    try:
        in_flight = None  # batch k's results are written while batch k + 1 runs on the devices
        for _ in range(num_batches):
            lo, hi, ids, mask, pixels, truncated = pipeline.next()
            inputs = (jax.device_put(x, batch_sharding) for x in (ids, mask, pixels))
            outputs = encode(text_params, image_params, *inputs)
            if in_flight:
                finish(*in_flight)
            in_flight = (lo, hi, ids, mask, outputs, truncated)
        if in_flight:
            finish(*in_flight)
    finally:
        bar.close()
        if pipeline:
            pipeline.close()
        pool.close()
    complete = state["done"] == total
    stats = None
    if complete and all(_part_done(out, p, process_count, n) for p in range(process_count)):
        stats = compute_clip_stats(out)
    return EmbedResult(out, folder.name, total, done_now, state["truncated"], time.perf_counter() - t0, complete,
                       stats)


def _write_rows(arrays: dict, rows: dict, lo: int, hi: int) -> None:
    """Writes examples [lo, hi) of the part and flushes them to disk (before progress.json says they exist)."""
    for k, a in arrays.items():
        a[lo:hi] = rows[k][:hi - lo]
        a.flush()


def _part_done(out: Path, p: int, count: int, n: int) -> bool:
    f = out / _part_name(p, count) / PROGRESS_FILE
    start, end = host_range(n, p, count)
    return f.exists() and json.loads(f.read_text())["done"] == end - start


def _check_or_write_meta(path: Path, meta: dict) -> None:
    if not path.exists():
        _write_json(path, meta)
        return
    old = json.loads(path.read_text())
    keys = ("dataset_fingerprint", "split", "num_examples", "process_count", "embed_dim", "text_len", "fields",
            "model", "image_model", "dtype")
    diff = {k: (old.get(k), meta[k]) for k in keys if old.get(k) != meta[k]}
    if diff:
        changes = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"{path.parent} already holds embeddings made differently ({changes}). Run the same "
                         "command to resume it, or choose another --out")


# ------------------------------------------------------------------------------------------------ statistics

def compute_clip_stats(path: str | os.PathLike, chunk: int = 65536) -> dict:
    """Per-dimension mean and std of the stored embeddings (the prior's clip_mean / clip_std); writes
    clip_stats.json and returns its content."""
    store = EmbeddingStore(path)
    out = {"num_examples": store.num_examples}
    for k in ("image_embeds", "text_embeds"):
        total = np.zeros(store.embed_dim, np.float64)
        total_sq = np.zeros(store.embed_dim, np.float64)
        for part in store.parts:
            for i in range(0, len(part[k]), chunk):
                x = np.asarray(part[k][i:i + chunk], np.float64)
                total += x.sum(0)
                total_sq += (x * x).sum(0)
        mean = total / store.num_examples
        std = np.sqrt(np.maximum(total_sq / store.num_examples - mean * mean, 0.0))
        out[k] = {"mean": mean.tolist(), "std": std.tolist()}
    _write_json(Path(path) / STATS_FILE, out)
    return out


def load_clip_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """clip_stats.json -> {"image_embeds_mean", "image_embeds_std", "text_embeds_mean", "text_embeds_std"}:
    float32 arrays of shape (1, D), the shape of the prior's `clip_mean` / `clip_std` parameters."""
    f = Path(path) / STATS_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: the embed job writes it when every part is done "
                                "(or call unclip_jax.data.embed.compute_clip_stats)")
    d = json.loads(f.read_text())
    return {f"{k}_{s}": np.asarray(d[k][s], np.float32)[None] for k in ("image_embeds", "text_embeds")
            for s in ("mean", "std")}
