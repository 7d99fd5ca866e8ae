"""`unclip-jax data build`: image-caption pairs from disk -> a TFDS dataset (ArrayRecord files, random access).

    report = build_dataset("laion_shards/{00000..00099}.tar", "data/laion")   # or a folder, or tfds:coco_captions
    builder = load_dataset("data/laion")                                     # tfds.core.ReadOnlyBuilder

Every example is one cleaned image and its caption:

    image    8-bit RGB, JPEG or PNG bytes (originals kept byte-for-byte when nothing had to change)
    caption  str
    key      where it came from (relative path, shard/key, name/split/index)
    width, height

Images are checked and converted in parallel threads (Pillow decodes without the GIL); what was skipped or
converted, and why, is counted in `BuildReport`, printed at the end and saved as `<out>/build_report.json`.
Building needs no TensorFlow: TFDS writes and reads ArrayRecord with numpy alone.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from unclip_jax.data import readers
from unclip_jax.data.clean import BuildReport, CleanOptions, Skip, clean_caption, clean_image

NAME = "image_captions"
REPORT_FILE = "build_report.json"


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The DatasetInfo of a dataset built here, never one of tfds' published ones: a builder whose folder is not
    written yet does not look on tfds' GCS bucket for it. (tfds' lookup makes an empty tempfile.mkdtemp("tfds")
    folder even with GCS disabled, and never removes it: one /tmp/tmp*tfds per dataset built.)"""

    def initialize_from_bucket(self) -> None:
        return None


class ImageCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Cleaned image-caption pairs; one `train` split. Built by `build_dataset`, read with `load_dataset`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "unclip_jax image-caption pairs: 8-bit RGB images, captions, source keys."}
    # Local sources have no download checksums to look up next to the code; tfds' lookup of this path would
    # also need the `importlib_resources` backport, which tfds does not install on Python >= 3.9.
    code_path = None

    def __init__(self, *, data_dir, candidates: Callable[[BuildReport], Iterable[readers.Candidate]],
                 report: BuildReport, options: CleanOptions = CleanOptions(), workers: int | None = None,
                 description: str = ""):
        self._candidates, self._report, self._options = candidates, report, options
        self._workers = workers or min(32, (os.cpu_count() or 1) + 4)
        self._description = description
        super().__init__(data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self, description=self._description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="jpeg"),
                "caption": tfds.features.Text(),
                "key": tfds.features.Text(),
                "width": tfds.features.Scalar(np.int32),
                "height": tfds.features.Scalar(np.int32),
            }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        report, options = self._report, self._options

        def work(c: readers.Candidate):
            if c.skip:
                return c.key, None, c.skip
            try:
                caption = clean_caption(c.caption.read_bytes() if isinstance(c.caption, Path) else c.caption)
                data = c.image.read_bytes() if isinstance(c.image, Path) else c.image
                return c.key, (caption, clean_image(data, options)), None
            except Skip as e:
                return c.key, None, e.reason
            except OSError as e:  # the file vanished or cannot be read
                return c.key, None, f"cannot read image file ({type(e).__name__})"

        # Keys are unique across shards by construction (shard/key, relative paths, name#n); a malformed tar can
        # still repeat a key inside one shard, which tfds would refuse at the end of the build.
        shard, seen = None, set()
        for key, result, reason in _ordered_map(work, self._candidates(report), self._workers):
            if result is None:
                report.skip(key, reason)
                continue
            if key.split("/", 1)[0] != shard:
                shard, seen = key.split("/", 1)[0], set()
            if key in seen:
                report.skip(key, "duplicate key")
                continue
            seen.add(key)
            caption, cleaned = result
            report.keep(cleaned.conversions)
            yield key, {"image": cleaned.data, "caption": caption, "key": key,
                        "width": np.int32(cleaned.width), "height": np.int32(cleaned.height)}


def _ordered_map(fn, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """fn over items in `workers` threads, results in input order, at most `window` in flight."""
    window = window or 4 * workers
    pending = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="unclip-build") as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build_dataset(source: str, out: str | os.PathLike, *, options: CleanOptions = CleanOptions(),
                  workers: int | None = None, overwrite: bool = False, verbose: bool = True,
                  **reader_options) -> BuildReport:
    """Builds the dataset at `out` from `source` (see `readers`); returns the report (also in out/build_report.json).

    reader_options: captions, image_column, caption_column (folders); split, data_dir, image_key, caption_key,
    all_captions (tfds sources).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to rebuild it, "
                                  "or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    report = BuildReport(source=str(source))
    kind = readers.source_kind(str(source))
    description = (f"Built by unclip_jax from {kind} source {source} with min_size={options.min_size}, "
                   f"max_size={options.max_size}, max_aspect={options.max_aspect}.")
    builder = ImageCaptions(data_dir=out, report=report, options=options, workers=workers, description=description,
                            candidates=lambda r: readers.candidates(str(source), r, **reader_options))
    with tempfile.TemporaryDirectory() as nothing_to_download:  # keeps tfds' empty downloads/ out of `out`
        builder.download_and_prepare(download_dir=nothing_to_download)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if verbose:
        print(report.summary())
        print(f"wrote {report.kept} examples to {builder.data_dir}")
    return report


def dataset_dir(path: str | os.PathLike) -> Path:
    """The folder holding dataset_info.json: `path` itself, or the newest version under path/<builder name>/
    (image_captions/ for `unclip-jax data build`, shapes_scenes/ for the demo's generated dataset)."""
    path = Path(path)
    if (path / "dataset_info.json").exists():
        return path
    found = [p.parent for p in path.glob("*/*/dataset_info.json")]
    names = {p.parent.name for p in found}
    if len(names) > 1:
        raise FileNotFoundError(f"{path} holds several datasets ({', '.join(sorted(names))}): pass the one you "
                                f"mean, e.g. {path}/<name>/<version>")
    versions = sorted(found, key=lambda p: (tfds.core.Version(p.name).tuple if tfds.core.Version.is_valid(p.name)
                                            else (-1,), p.name))
    if not versions:
        raise FileNotFoundError(f"{path} holds no dataset built by `unclip-jax data build` (no dataset_info.json "
                                f"in it or in {path / NAME}/<version>/)")
    return versions[-1]


def load_dataset(path: str | os.PathLike):
    """A built dataset (its `out` folder or its version folder) -> tfds ReadOnlyBuilder."""
    return tfds.builder_from_directory(str(dataset_dir(path)))


def load_report(path: str | os.PathLike) -> BuildReport:
    """The build report saved next to a dataset."""
    path = Path(path)
    for p in (path, *path.parents[:3]):
        if (p / REPORT_FILE).exists():
            return BuildReport.from_dict(json.loads((p / REPORT_FILE).read_text()))
    raise FileNotFoundError(f"no {REPORT_FILE} at {path} or above it")
