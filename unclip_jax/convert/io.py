"""Finding and reading checkpoint files: diffusers / transformers folders, hub ids, safetensors, .bin.

Readers open tensors lazily (safetensors through a memory map), so conversion holds at most the
converted parameters plus one source tensor in host memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, corrupt, or does not fit the model."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

# Weight file names, in order of preference, for diffusers and transformers components.
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class SafetensorsReader:
    """Reads one .safetensors file through a memory map; validates the header against the file size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path} is corrupt or truncated: {size} bytes, too short for a "
                                          "safetensors header")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise CheckpointError(f"{self.path} is corrupt or truncated: its header claims {n} bytes but "
                                          f"the file has {size}")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} is corrupt: its safetensors header is not valid JSON ({e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(f"{self.path} is truncated: the tensors need {self.data_start + end} bytes but the "
                                  f"file has {size} (an interrupted download or copy? fetch it again)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        e = self.entries[key]
        if e["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has dtype {e['dtype']}, which unclip_jax cannot read")
        start, end = e["data_offsets"]
        raw = self._map[self.data_start + start:self.data_start + end]
        return raw.view(SAFETENSORS_DTYPES[e["dtype"]]).reshape(e["shape"])


class TorchBinReader:
    """Reads a PyTorch .bin state dict with torch.load(weights_only=True); needs torch installed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{self.path} is a PyTorch .bin checkpoint, which needs torch to read: "
                                  "`pip install torch`, or convert it to .safetensors") from None
        try:
            self.state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many kinds here; all mean the same to the user
            raise CheckpointError(f"{self.path} could not be read as a PyTorch checkpoint (corrupt or truncated?): "
                                  f"{type(e).__name__}: {e}") from None

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str) -> np.ndarray:
        import torch
        t = self.state[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class ShardedReader:
    """Several files named by a `*.index.json` weight map, read as one."""

    def __init__(self, index_path: Path, reader_cls):
        self.path = Path(index_path)
        try:
            weight_map = json.loads(self.path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{self.path} is not a valid weight index ({e})") from None
        self.files = {}
        self.owner = {}
        for key, fname in weight_map.items():
            if fname not in self.files:
                shard = self.path.parent / fname
                if not shard.exists():
                    raise CheckpointError(f"{shard} is missing; {self.path.name} lists it as a shard")
                self.files[fname] = reader_cls(shard)
            self.owner[key] = self.files[fname]

    def keys(self) -> list[str]:
        return list(self.owner)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.owner[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self.owner[key].get(key)


def weight_candidates(variant: str | None = None) -> Iterator[str]:
    suffix = f".{variant}" if variant else ""
    for stem in WEIGHT_NAMES:
        yield f"{stem}{suffix}.safetensors"
        yield f"{stem}{suffix}.safetensors.index.json"
    for stem in WEIGHT_NAMES + ("pytorch_model",):  # the last is transformers' legacy name
        yield f"{stem}{suffix}.bin"
        yield f"{stem}{suffix}.bin.index.json"


def open_weights(folder: Path, variant: str | None = None):
    """Returns a reader for the weights in a component folder (safetensors preferred over .bin)."""
    folder = Path(folder)
    names = list(weight_candidates(variant))
    for name in names:
        path = folder / name
        if path.exists():
            if name.endswith(".safetensors"):
                return SafetensorsReader(path)
            if name.endswith(".safetensors.index.json"):
                return ShardedReader(path, SafetensorsReader)
            if name.endswith(".bin"):
                return TorchBinReader(path)
            return ShardedReader(path, TorchBinReader)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"no weight file in {folder}: expected one of {', '.join(names)}; "
                          f"the folder holds {present or 'nothing'}")


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: every component folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and os.sep not in s.replace("/", "")


DEMO = "demo"  # the model name of the shipped demo (unclip_jax/demo/model)


def resolve_folder(path_or_id: str | os.PathLike, name: str | None = None, *, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt")) -> Path:
    """A local pipeline or component folder, or a hub id fetched through huggingface_hub.

    Hub downloads honour the local cache and HF_HUB_OFFLINE=1 (then only the cache is read). With
    `name`, only that component's files (and the pipeline's model_index.json) are fetched. "demo" is the small
    unCLIP that ships inside the package (unclip_jax.demo), when no folder of that name exists here.
    """
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_id)
    if s == DEMO:
        from unclip_jax.demo import model_dir
        return model_dir()
    if not _looks_like_hub_id(s):
        raise CheckpointError(f"{s} is neither an existing folder nor a hub id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{s} is not a local folder and huggingface_hub is not installed to fetch it") from None
    allow = ["model_index.json"] + ([f"{name}/{pat}" for pat in patterns] if name else list(patterns))
    try:
        local = snapshot_download(s, revision=revision, allow_patterns=allow, cache_dir=cache_dir)
    except Exception as e:
        raise CheckpointError(f"could not fetch {s} from the hub or find it in the local cache "
                              f"({type(e).__name__}: {e}); with no network, set HF_HUB_OFFLINE=1 and make sure "
                              "the model is in the cache, or pass a local folder") from None
    local = Path(local)
    if name and not (local / name).exists() and not (local / "config.json").exists():
        # Only .bin weights on the hub: fetch those too.
        local = Path(snapshot_download(s, revision=revision, allow_patterns=allow + [f"{name}/*.bin"],
                                       cache_dir=cache_dir))
    return local


def component_folder(root: Path, name: str) -> Path:
    """`root/name` in a pipeline folder, or `root` itself when it is a single component's folder."""
    if (root / name / "config.json").exists():
        return root / name
    if (root / "config.json").exists():
        return root
    if (root / name).is_dir():
        raise CheckpointError(f"{root / name / 'config.json'} is missing: every component folder needs its config.json")
    inside = sorted(q.name for q in root.iterdir()) if root.is_dir() else []
    raise CheckpointError(f"{root} has no component {name!r}: expected {root / name}/config.json (a diffusers "
                          f"pipeline folder) or {root}/config.json (a component folder); it holds {inside}")
