"""What the trainer eats: the data-source protocol, deterministic synthetic batches, `make_source`.

A source is an iterator of THIS HOST's part of the global batch (leading dimension
global_batch // process_count) as a dict of numpy arrays, resumable through a JSON-serialisable state:

    source = make_source(config, "decoder")
    batch = next(source)              # {"image": (B, S, S, 3) float32 in [-1, 1], ...}
    state = source.get_state()        # saved with every checkpoint
    source.set_state(state)           # on resume: the next batch is the one that would have come next

Keys per stage (B = per-host batch, L = text tokens, D = CLIP width, S = decoder size, C = crop size,
P = clip_image_size):

    clip:       pixel_values (B, P, P, 3) float32 (CLIP-normalised, NHWC), input_ids (B, L) int32,
                attention_mask (B, L) bool
    prior:      input_ids (B, L) int32, attention_mask (B, L) bool, text_embeds (B, D) float32,
                image_embeds (B, D) float32, [text_hidden_states (B, L, Dt) float32]
    decoder:    image (B, S, S, 3) float32 in [-1, 1], image_embeds, text_embeds, input_ids,
                attention_mask, [text_hidden_states]
    upsampler:  image (B, C, C, 3) float32 in [-1, 1] (high-resolution random crops),
                [low_res (B, C/f, C/f, 3), already degraded]   (also for upsampler_1024)

Keys in [brackets] are optional: without text_hidden_states the train step runs the frozen CLIP text tower
on input_ids; without low_res it downsamples and degrades `image` on device.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

REQUIRED = {
    "clip": ("pixel_values", "input_ids", "attention_mask"),
    "prior": ("input_ids", "attention_mask", "text_embeds", "image_embeds"),
    "decoder": ("image", "image_embeds", "text_embeds", "input_ids", "attention_mask"),
    "upsampler": ("image",),
    "upsampler_1024": ("image",),
}
OPTIONAL = {"clip": (), "prior": ("text_hidden_states",), "decoder": ("text_hidden_states",), "upsampler": ("low_res",),
            "upsampler_1024": ("low_res",)}


@runtime_checkable
class DataSource(Protocol):
    """An iterator of per-host batches that can be checkpointed and resumed (see the module docstring)."""

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch: this host's rows of the global batch, numpy arrays keyed as in REQUIRED/OPTIONAL."""

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable position in the stream."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position returned by get_state (possibly by another process, before a restart)."""


def make_source(config, stage: str | None = None) -> DataSource:
    """The one entry point the trainer uses: the source named by `config.data` for `stage`.

    "synthetic": SyntheticData (deterministic, with the fixed-batch overfit mode). Anything else (a dataset
    folder from `unclip-jax data build`, or a ConfigDict with kind/dir/...) goes to the data pipeline,
    unclip_jax.data.make_source, which reads the same config keys (batch_size, seed, image_size, crop_size,
    upsample_factor, degradation, text_length, clip_dim, ...).
    """
    stage = stage or config.stage
    if config.data == "synthetic":
        return SyntheticData(stage, config, seed=config.seed)
    from unclip_jax.data import make_source as pipeline_source
    return pipeline_source(config, stage)


def local_batch_size(config) -> int:
    """Rows each host feeds: the global batch split evenly over processes."""
    n = jax.process_count()
    if config.batch_size % n:
        raise ValueError(f"batch_size={config.batch_size} is not a multiple of the {n} processes (hosts)")
    return config.batch_size // n


def check_batch(stage: str, batch: dict, config, rows: int) -> None:
    """Raises a ValueError naming every missing key and every array of the wrong shape."""
    L, D, Dt = config.text_length, config.clip_dim, config.text_hidden_dim
    S, C = config.image_size, config.crop_size
    expected = {"input_ids": (rows, L), "attention_mask": (rows, L), "text_embeds": (rows, D),
                "image_embeds": (rows, D), "text_hidden_states": (rows, L, Dt)}
    if stage == "clip":
        P = config.clip_image_size
        expected["pixel_values"] = (rows, P, P, 3)
    if stage == "decoder":
        expected["image"] = (rows, S, S, 3)
    elif stage.startswith("upsampler"):
        f = config.upsample_factor
        expected.update(image=(rows, C, C, 3), low_res=(rows, C // f, C // f, 3))
    problems = [f"missing key {k!r}" for k in REQUIRED[stage] if k not in batch]
    for k, v in batch.items():
        if k in expected and tuple(np.shape(v)) != expected[k]:
            problems.append(f"{k} has shape {tuple(np.shape(v))}, expected {expected[k]}")
    if problems:
        raise ValueError(f"the {stage} batch from config.data={config.data!r} does not fit the config: "
                         + "; ".join(problems) + " (rows = batch_size / hosts; sizes from config.text_length, "
                         "clip_dim, text_hidden_dim, image_size, crop_size, upsample_factor)")


class SyntheticData:
    """Deterministic random batches with learnable structure, for tests, benchmarks and smoke runs.

    Batch i depends only on (seed, i, host), so a source restored with set_state continues exactly. The
    image embedding is a fixed function of the text embedding plus noise, and images are smooth patterns
    drawn from the image embedding, so every stage has something to learn. With config.data_overfit every
    batch is batch 0 (overfitting a fixed batch); the position still advances.
    """

    def __init__(self, stage: str, config, seed: int = 0):
        if stage not in REQUIRED:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(REQUIRED)}")
        self.stage, self.seed = stage, int(seed)
        self.rows = local_batch_size(config)
        self.L, self.D, self.Dt = config.text_length, config.clip_dim, config.text_hidden_dim
        self.vocab = config.vocab_size
        self.S, self.C, self.f = config.image_size, config.crop_size, config.upsample_factor
        self.P = config.clip_image_size
        self.overfit = bool(config.data_overfit)
        self.with_hidden = bool(config.data_text_hidden_states)
        # Fixed "world" maps shared by all batches (and hosts): text -> image embedding, embedding -> image.
        w = np.random.default_rng([self.seed, 7919])
        # Token ids are hashed into at most 4096 rows: Karlo's 49408 x 768 table would be 150 MB of nothing.
        self._token_table = w.standard_normal((min(self.vocab, 4096), self.D)).astype(np.float32) / np.sqrt(self.D)
        self._text_to_image = w.standard_normal((self.D, self.D)).astype(np.float32) / np.sqrt(self.D)
        self._hidden_proj = w.standard_normal((self.D, self.Dt)).astype(np.float32)
        self._image_basis = w.standard_normal((self.D, 4 * 3)).astype(np.float32) / np.sqrt(self.D)
        self.index = 0

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, Any]:
        return {"kind": "synthetic", "stage": self.stage, "seed": self.seed, "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "synthetic" or state.get("stage") != self.stage:
            raise ValueError(f"data state {state} was not written by a synthetic {self.stage} source")
        self.index = int(state["index"])

    def __next__(self) -> dict[str, np.ndarray]:
        i = 0 if self.overfit else self.index
        self.index += 1
        rng = np.random.default_rng([self.seed, i, jax.process_index()])
        if self.stage.startswith("upsampler"):
            return {"image": self._patterns(rng, self.C, rng.standard_normal((self.rows, self.D)), detail=True)}
        batch = self._text(rng)
        if self.stage == "clip":  # the image tower sees patterns drawn from the caption's embedding
            patterns = self._patterns(rng, self.P, batch.pop("image_embeds"), detail=False)
            return {"pixel_values": 2.0 * patterns, "input_ids": batch["input_ids"],
                    "attention_mask": batch["attention_mask"]}
        if self.stage == "decoder":
            batch["image"] = self._patterns(rng, self.S, batch["image_embeds"], detail=False)
        return batch

    # ------------------------------------------------------------------------------------------------

    def _text(self, rng) -> dict[str, np.ndarray]:
        B, L = self.rows, self.L
        n = rng.integers(1, max(2, L - 1), size=(B, 1))                  # words per caption
        pos = np.arange(L)[None]
        words = rng.integers(1, self.vocab - 2, size=(B, L))
        # [<|startoftext|>, words..., <|endoftext|>, pad (id 0, "!" in Karlo's tokenizer)...]
        ids = np.where(pos == 0, self.vocab - 2, np.where(pos <= n, words, np.where(pos == n + 1, self.vocab - 1, 0)))
        ids = ids.astype(np.int32)
        mask = pos <= n + 1
        tokens = self._token_table[ids % len(self._token_table)]
        bag = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        text_embeds = bag * np.sqrt(self.D)
        image_embeds = np.tanh(text_embeds @ self._text_to_image) + 0.1 * rng.standard_normal((B, self.D))
        out = {"input_ids": ids, "attention_mask": mask, "text_embeds": text_embeds.astype(np.float32),
               "image_embeds": image_embeds.astype(np.float32)}
        if self.with_hidden:
            hidden = np.tanh(tokens @ self._hidden_proj) * mask[..., None]
            out["text_hidden_states"] = hidden.astype(np.float32)
        return out

    def _patterns(self, rng, size: int, embeds: np.ndarray, detail: bool) -> np.ndarray:
        """Smooth colour waves set by the embedding (plus fine texture for upsamplers), in [-1, 1]."""
        p = (embeds @ self._image_basis).reshape(-1, 4, 3)                # (B, 4, 3): fx, fy, phase, amp
        y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
        fx, fy = 1 + 2 * np.abs(p[:, 0]), 1 + 2 * np.abs(p[:, 1])
        img = np.sin(2 * np.pi * (fx[:, None, None] * x[None, ..., None] + fy[:, None, None] * y[None, ..., None])
                     + 3 * p[:, 2][:, None, None])
        img = 0.7 * np.tanh(p[:, 3])[:, None, None] * img
        if detail:
            img = img + 0.2 * np.sin(2 * np.pi * size / 3 * (x + y))[None, ..., None]
        img = img + 0.05 * rng.standard_normal(img.shape)
        return np.clip(img, -1, 1).astype(np.float32)
