"""What users have on disk, as a stream of candidate examples (key, image bytes or path, caption).

    folder of images with side-car captions     photos/cat.jpg + photos/cat.txt (or cat.json {"caption": ...})
    folder of images + one caption table          --captions captions.csv / .jsonl / .tsv  (or metadata.jsonl,
                                                  metadata.csv in the folder, as Hugging Face's imagefolder)
    webdataset tar shards (img2dataset output)    'shards/{00000..00099}.tar', a glob, a .tar, or a folder of them
    a prepared tfds dataset                       tfds:coco_captions (catalogue name) or tfds:/path/to/name/1.0.0

Readers only find examples; `clean` decides what is kept. Candidates that are already known to be bad
(a caption without its image, an image without its caption) carry their skip reason, so the builder counts them.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from unclip_jax.data.clean import BuildReport

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
CAPTION_EXTENSIONS = {"txt", "json"}
IMAGE_COLUMNS = ("file_name", "image", "image_path", "path", "filepath", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "prompt", "TEXT", "title", "description")
AUTO_TABLES = ("metadata.jsonl", "metadata.csv")


@dataclasses.dataclass
class Candidate:
    key: str                            # unique within the dataset: relative path, shard/key, or name/split/index
    image: bytes | Path | None = None   # encoded bytes, or a file to read (read by the builder's workers)
    caption: str | bytes | Path | None = None  # text, UTF-8 bytes, or a .txt file to read
    skip: str | None = None             # set when the reader already knows the example cannot be used


def caption_from_json(data: bytes) -> str | None:
    """img2dataset's side-car .json: {"caption": ...} (or "text")."""
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(d, dict):
        for k in ("caption", "text", "TEXT"):
            if isinstance(d.get(k), str):
                return d[k]
    return None


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


# ------------------------------------------------------------------------------------------------ folders

def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def read_table(path: Path, image_column: str | None = None,
               caption_column: str | None = None) -> list[tuple[str, str | None]]:
    """A CSV / TSV / JSONL captions table -> [(image path as written, caption or None)]."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    if not rows:
        return []
    columns = list(rows[0])

    def pick(given, candidates, what):
        if given:
            if given not in columns:
                raise ValueError(f"{path} has no column {given!r}; its columns are {columns}")
            return given
        for c in candidates:
            if c in columns:
                return c
        raise ValueError(f"{path}: no {what} column found among {columns}; name it with --{what}-column "
                         f"(looked for {', '.join(candidates)})")

    img, cap = pick(image_column, IMAGE_COLUMNS, "image"), pick(caption_column, CAPTION_COLUMNS, "caption")
    return [(str(r.get(img) or ""), r.get(cap)) for r in rows]


def folder_candidates(root: str | os.PathLike, report: BuildReport, *, captions: str | os.PathLike | None = None,
                      image_column: str | None = None, caption_column: str | None = None) -> Iterator[Candidate]:
    """Images under `root` (recursively, in sorted order) with side-car captions or one captions table."""
    root = Path(root)
    files = _walk(root)
    table_path = Path(captions) if captions else next((root / t for t in AUTO_TABLES if (root / t).exists()), None)
    images = [f for f in files if _ext(f.name) in IMAGE_EXTENSIONS]
    if table_path is not None:
        rows = read_table(table_path, image_column, caption_column)
        base = root
        listed: dict[str, int] = {}
        for rel, caption in rows:
            path = (base / rel) if not os.path.isabs(rel) else Path(rel)
            key = path.relative_to(root).as_posix() if path.is_relative_to(root) else rel
            n = listed.get(key, 0)
            listed[key] = n + 1
            key_n = key if n == 0 else f"{key}#{n}"
            if not rel or not path.is_file():
                yield Candidate(key_n or "(empty path)", skip="missing image file")
            else:
                yield Candidate(key_n, path, caption)
        for f in images:
            rel = f.relative_to(root).as_posix()
            if rel not in listed:
                yield Candidate(rel, skip="missing caption")
        for f in files:
            if _ext(f.name) not in IMAGE_EXTENSIONS and f != table_path:
                report.ignore(f"files not in the table (.{_ext(f.name) or 'no extension'})")
        return
    by_stem: dict[Path, dict[str, Path]] = {}
    for f in files:
        by_stem.setdefault(f.parent / (f.name.rsplit(".", 1)[0] if "." in f.name else f.name), {})[_ext(f.name)] = f
    for stem, parts in sorted(by_stem.items()):
        image_exts = [e for e in parts if e in IMAGE_EXTENSIONS]
        key = stem.relative_to(root).as_posix()
        for e in parts:
            if e not in IMAGE_EXTENSIONS and e not in CAPTION_EXTENSIONS:
                report.ignore(f".{e or 'no extension'} files")
        if not image_exts:
            if "txt" in parts or ("json" in parts and caption_from_json(parts["json"].read_bytes()) is not None):
                yield Candidate(key, skip="caption without image")
            elif "json" in parts:  # img2dataset's *_stats.json and the like
                report.ignore(".json files without an image or a caption")
            continue
        caption = None
        if "txt" in parts:
            caption = parts["txt"]  # read by the builder's worker threads
        elif "json" in parts:
            caption = caption_from_json(parts["json"].read_bytes())
        for e in sorted(image_exts):
            k = key + "." + e if len(image_exts) > 1 else key
            if caption is None:
                yield Candidate(k, skip="missing caption")
            else:
                yield Candidate(k, parts[e], caption)


# ------------------------------------------------------------------------------------------------ tar shards

def expand_braces(pattern: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (webdataset / img2dataset notation)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def tar_shards(source: str) -> list[Path]:
    """The shard files a tar source names, sorted; ValueError when there are none."""
    p = Path(source)
    if p.is_dir():
        shards = sorted(p.rglob("*.tar"))
    elif "{" in source:
        shards = [Path(s) for s in expand_braces(source)]
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) of {source} do not exist, e.g. {missing[:3]}")
    else:
        shards = sorted(Path(s) for s in glob.glob(source))
    if not shards:
        raise ValueError(f"no .tar shards found at {source}")
    return shards


def _group(key: str, parts: dict[str, bytes], report: BuildReport) -> Candidate | None:
    image_exts = sorted(e for e in parts if e in IMAGE_EXTENSIONS)
    for e in parts:
        if e not in IMAGE_EXTENSIONS and e not in CAPTION_EXTENSIONS:
            report.ignore(f".{e or 'no extension'} members")
    caption = parts.get("txt")
    if caption is None and "json" in parts:
        caption = caption_from_json(parts["json"])
    if not image_exts:
        if caption is not None:
            return Candidate(key, skip="caption without image")
        if "json" in parts:
            report.ignore(".json members without an image or a caption")
        return None
    for e in image_exts[1:]:
        report.ignore(f"second images of one key (.{e}; the .{image_exts[0]} was used)")
    if caption is None:
        return Candidate(key, skip="missing caption")
    return Candidate(key, parts[image_exts[0]], caption)


def tar_candidates(source: str, report: BuildReport) -> Iterator[Candidate]:
    """Webdataset shards: members grouped by key (the path up to the first dot of the file name)."""
    root = Path(source) if Path(source).is_dir() else None
    for shard in tar_shards(source):
        name = shard.relative_to(root).as_posix() if root else shard.name
        current, parts = None, {}
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = os.path.split(member.name)
                    key = os.path.join(directory, base.split(".", 1)[0])
                    ext = base.split(".", 1)[1].lower() if "." in base else ""
                    if key != current:
                        if current is not None and (c := _group(f"{name}/{current}", parts, report)):
                            yield c
                        current, parts = key, {}
                    data = tar.extractfile(member).read()
                    if ext in parts:
                        report.ignore(f"duplicate .{ext} members")
                    parts[ext] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            yield Candidate(f"{name}/{current or ''}", skip=f"tar shard cut short or corrupt ({type(e).__name__}); "
                                                               "the rest of that shard is unread")
            continue
        if current is not None and (c := _group(f"{name}/{current}", parts, report)):
            yield c


# ------------------------------------------------------------------------------------------------ tfds

def _get(example: dict, path: str):
    for part in path.split("/"):
        example = example[part]
    return example


def tfds_candidates(source: str, report: BuildReport, *, split: str = "train", data_dir: str | None = None,
                    image_key: str = "image", caption_key: str = "caption",
                    all_captions: bool = False) -> Iterator[Candidate]:
    """A prepared tfds dataset: `name` (catalogue, found in data_dir) or a folder holding dataset_info.json.

    caption_key may point into nested features ("captions/text" for coco_captions); a sequence of captions gives
    its first caption, or one example per caption with all_captions.
    """
    import numpy as np
    import tensorflow_datasets as tfds

    spec = source[len("tfds:"):] if source.startswith("tfds:") else source
    if Path(spec).exists():
        builder = tfds.builder_from_directory(spec)
    else:
        from tensorflow_datasets.core import read_only_builder
        try:  # the prepared files alone: catalogue builders' code may need TensorFlow just to be constructed
            builder = read_only_builder.builder_from_files(spec, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(f"tfds dataset {spec!r} is not prepared in {data_dir or 'the default tfds data dir'}: "
                             f"prepare it first (`tfds build {spec.split('/')[0]}`), pass its data dir with "
                             "--tfds-data-dir, or give its folder as tfds:/path/to/name/version") from None
    decoders = {}
    node = decoders
    parts = image_key.split("/")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = tfds.decode.SkipDecoding()
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        ds = builder.as_data_source(split=split, decoders=decoders)
        examples = (ds[i] for i in range(len(ds)))
    else:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise ValueError(f"{spec} is stored as {builder.info.file_format.value}; reading it needs TensorFlow "
                             "(pip install tensorflow-cpu), or convert it once to array_record with "
                             "`tfds convert_format --root_data_dir ... --out_file_format array_record`") from None
        examples = tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders, shuffle_files=False))
    name = builder.info.name
    for i, ex in enumerate(examples):
        key = f"{name}/{split}/{i}"
        try:
            image = _get(ex, image_key)
        except KeyError:
            raise ValueError(f"{name} has no feature {image_key!r}; its features are "
                             f"{list(builder.info.features.keys())}: name it with --image-key") from None
        try:
            caption = _get(ex, caption_key)
        except KeyError:
            raise ValueError(f"{name} has no feature {caption_key!r}; its features are "
                             f"{list(builder.info.features.keys())}: name it with --caption-key") from None
        image = bytes(image)
        if isinstance(caption, (np.ndarray, list, tuple)):
            captions = list(caption)
            if not captions:
                yield Candidate(key, skip="missing caption")
                continue
            if all_captions:
                for j, c in enumerate(captions):
                    yield Candidate(f"{key}#{j}", image, c)
                continue
            caption = captions[0]
        yield Candidate(key, image, caption)


# ------------------------------------------------------------------------------------------------ dispatch

def source_kind(source: str) -> str:
    """'tfds', 'tar' or 'folder' for a --source string (a folder with .tar files at its top is a tar source)."""
    if source.startswith("tfds:"):
        return "tfds"
    p = Path(source)
    if (p.is_file() and p.suffix == ".tar") or "{" in source or any(c in source for c in "*?["):
        return "tar"
    if p.is_dir():
        top = [f for f in p.iterdir() if f.is_file()]
        has_tars = any(f.suffix == ".tar" for f in top)
        return "tar" if has_tars and not any(_ext(f.name) in IMAGE_EXTENSIONS for f in top) else "folder"
    raise ValueError(f"--source {source}: not a folder, a .tar shard or shard pattern, or tfds:NAME")


def candidates(source: str, report: BuildReport, **options) -> Iterator[Candidate]:
    """Candidates of any source kind; options are those of the kind's reader (others must be None)."""
    kind = source_kind(source)
    if kind == "tfds":
        keys = ("split", "data_dir", "image_key", "caption_key", "all_captions")
        return tfds_candidates(source, report, **{k: v for k, v in options.items() if k in keys and v is not None})
    if kind == "tar":
        return tar_candidates(source, report)
    keys = ("captions", "image_column", "caption_column")
    return folder_candidates(source, report, **{k: v for k, v in options.items() if k in keys})
