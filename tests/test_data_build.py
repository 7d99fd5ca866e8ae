"""`unclip-jax data build`: every example is kept, converted or skipped, and every skip is counted with its reason."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data import build_dataset, load_dataset, load_report
from unclip_jax.data import cli
from unclip_jax.data.clean import CleanOptions
from unclip_jax.data.sampler import host_range


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(h=80, w=96, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_rgb16(h=72, w=72) -> bytes:
    """A 48-bit RGB PNG, written by hand (Pillow cannot write one)."""
    rows = b"".join(b"\x00" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return encode(rgb(70, 100, seed=9), "JPEG", exif=exif)


def read_all(out):
    ds = load_dataset(out).as_data_source("train")
    return {ex["key"].decode(): ex for ex in (ds[i] for i in range(len(ds)))}


# ------------------------------------------------------------------------------------------------ folders

@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    files = {
        **{f"good{i}.jpg": encode(rgb(64 + 8 * i, 100, seed=i)) for i in range(5)},
        "sub/nested.png": encode(rgb(90, 90, seed=7), "PNG"),
        "gray.png": encode(Image.fromarray(np.arange(80 * 80, dtype=np.uint8).reshape(80, 80)), "PNG"),
        "rgba.png": encode(Image.new("RGBA", (80, 80), (255, 0, 0, 128)), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (80, 80), (0, 255, 255, 0))),
        "gray16.png": encode(Image.fromarray((np.arange(80 * 80).reshape(80, 80) * 10).astype(np.uint16)), "PNG"),
        "rgb16.png": png_rgb16(),
        "palette.png": encode(rgb(80, 80, seed=3).convert("P"), "PNG"),
        "photo.webp": encode(rgb(80, 80, seed=4), "WEBP"),
        "rotated.jpg": exif_rotated(),
        "tiny.png": encode(rgb(20, 200), "PNG"),
        "truncated.jpg": encode(rgb(seed=5))[:1500],
        "garbage.jpg": b"this is not an image" * 20,
        "empty_caption.jpg": encode(rgb(seed=6)),
        "no_caption.jpg": encode(rgb(seed=8)),
        "json_caption.jpg": encode(rgb(seed=10)),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for name in files:
        stem = name.rsplit(".", 1)[0]
        if name not in ("no_caption.jpg", "json_caption.jpg"):
            (root / f"{stem}.txt").write_text("   " if name == "empty_caption.jpg" else f"a picture called {stem}\n")
    (root / "json_caption.json").write_text(json.dumps({"caption": "from json", "url": "http://x"}))
    (root / "orphan.txt").write_text("a caption whose image is gone")
    (root / "README.md").write_text("not an example")
    return root


def test_folder_build_counts_every_kept_converted_and_skipped_example(messy_folder, tmp_path, own_tempdir):
    report = build_dataset(messy_folder, tmp_path / "out", verbose=False)
    assert not list(own_tempdir.iterdir())     # nothing left behind (tfds' GCS lookup used to leave a folder)
    assert report.skipped == {"smaller than 64 px": 1, "truncated image": 1, "unreadable image": 1,
                              "empty caption": 1, "missing caption": 1, "caption without image": 1}
    assert report.converted == {"grayscale -> RGB": 2, "alpha -> composited on white": 1, "CMYK -> RGB": 1,
                                "16-bit -> 8-bit": 2, "palette -> RGB": 1, "WEBP -> JPEG": 1,
                                "EXIF orientation applied": 1}
    assert report.kept == 15 and report.seen == report.kept + sum(report.skipped.values()) == 21
    assert report.ignored == {".md files": 1}
    assert report.samples["truncated image"] == ["truncated"]
    assert load_report(tmp_path / "out").to_dict() == report.to_dict()

    examples = read_all(tmp_path / "out")
    assert len(examples) == 15
    for key, ex in examples.items():
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (ex["height"], ex["width"], 3), key
    assert examples["json_caption"]["caption"] == b"from json"
    assert examples["sub/nested"]["caption"] == b"a picture called sub/nested"
    assert examples["rotated"]["image"].shape == (100, 70, 3)  # EXIF orientation 6: portrait on display
    red_on_white = examples["rgba"]["image"][0, 0].astype(int)  # half-transparent red over white, JPEG-coded
    assert np.abs(red_on_white - [255, 127, 127]).max() <= 2
    np.testing.assert_array_equal(examples["good0"]["image"], np.asarray(Image.open(messy_folder / "good0.jpg")))


def test_size_and_aspect_limits_are_skips_with_their_own_reason(messy_folder, tmp_path):
    options = CleanOptions(min_size=85, max_size=90, max_aspect=1.1)
    report = build_dataset(messy_folder, tmp_path / "out", options=options, verbose=False)
    assert report.skipped["smaller than 85 px"] == 13
    assert report.skipped["aspect ratio above 1.1"] == 1  # good3: 88 x 100
    assert report.kept == 2  # sub/nested (90 x 90) and good4 (96 x 100, resized to shorter side 90)
    assert report.converted == {"resized to shorter side 90": 1}
    sizes = sorted((ex["height"], ex["width"]) for ex in read_all(tmp_path / "out").values())
    assert sizes == [(90, 90), (90, 94)]


@pytest.mark.parametrize("table", ["captions.csv", "metadata.jsonl"])
def test_captions_table_missing_files_and_unlisted_images_are_counted(tmp_path, table):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(encode(rgb(seed=i)))
    rows = [("0.jpg", "zero"), ("1.jpg", "one"), ("1.jpg", "one again"), ("gone.jpg", "missing file"),
            ("0.jpg", "")]
    if table.endswith(".csv"):
        path = tmp_path / table
        path.write_text("file_name,text\n" + "".join(f"{f},{c}\n" for f, c in rows))
    else:  # Hugging Face imagefolder's convention, found automatically
        path = root / table
        path.write_text("".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c in rows))
    report = build_dataset(root, tmp_path / "out", captions=path if table.endswith(".csv") else None, verbose=False)
    assert report.kept == 3
    assert report.skipped == {"missing image file": 1, "empty caption": 1, "missing caption": 1}  # 2.jpg unlisted
    captions = {k: ex["caption"].decode() for k, ex in read_all(tmp_path / "out").items()}
    assert captions == {"0.jpg": "zero", "1.jpg": "one", "1.jpg#1": "one again"}


# ------------------------------------------------------------------------------------------------ tar shards

def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, int]]:
    buf = io.BytesIO()
    offsets = {}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    return buf.getvalue(), offsets


def test_webdataset_shards_as_img2dataset_writes_them(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    meta = lambda c: json.dumps({"caption": c, "url": "u", "key": "k"}).encode()  # noqa: E731
    data, _ = _tar([
        ("000000000.jpg", encode(rgb(seed=1))), ("000000000.txt", b"first"), ("000000000.json", meta("first")),
        ("000000001.png", encode(rgb(seed=2), "PNG")), ("000000001.json", meta("caption only in json")),
        ("000000002.jpg", encode(rgb(seed=3).convert("L"))), ("000000002.txt", b"grey"),
        ("000000003.jpg", encode(rgb(seed=4))),                                     # no caption
        ("000000004.txt", b"no image"),                                             # no image
        ("000000005.jpg", encode(rgb(seed=5))[:2000]), ("000000005.txt", b"cut"),   # truncated image
        ("000000006.jpg", encode(rgb(seed=6))), ("000000006.txt", b"\xff\xfe bad"),  # not UTF-8
    ])
    (shards / "00000.tar").write_bytes(data)
    data, offsets = _tar([(f"{i:09d}.{ext}", encode(rgb(seed=10 + i)) if ext == "jpg" else f"c{i}".encode())
                          for i in range(3) for ext in ("jpg", "txt")])
    cut = offsets["000000002.jpg"] + 100  # the shard ends inside the third image: two examples survive
    (shards / "00001.tar").write_bytes(data[:cut])

    report = build_dataset(str(shards / "{00000..00001}.tar"), tmp_path / "out", verbose=False)
    assert report.kept == 5
    reason_cut = [r for r in report.skipped if r.startswith("tar shard cut short")]
    assert len(reason_cut) == 1
    assert report.skipped == {"missing caption": 1, "caption without image": 1, "truncated image": 1,
                              "caption is not UTF-8": 1, reason_cut[0]: 1}
    assert report.converted == {"grayscale -> RGB": 1}
    assert not report.ignored  # img2dataset's .json side-cars belong to their examples
    captions = {k: ex["caption"].decode() for k, ex in read_all(tmp_path / "out").items()}
    assert captions == {"00000.tar/000000000": "first", "00000.tar/000000001": "caption only in json",
                        "00000.tar/000000002": "grey", "00001.tar/000000000": "c0", "00001.tar/000000001": "c1"}
    # A folder of shards names the same data.
    again = build_dataset(str(shards), tmp_path / "out2", verbose=False)
    assert again.to_dict() | {"source": ""} == report.to_dict() | {"source": ""}


# ------------------------------------------------------------------------------------------------ tfds + CLI

class TinyCaptionsCatalogue(tfds.core.GeneratorBasedBuilder):
    """Stands in for a catalogue dataset such as coco_captions: an image and a list of captions."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            image = encode(rgb(seed=i) if i != 3 else rgb(30, 30))
            yield str(i), {"image": image, "captions": {"text": [f"image {i} caption {j}" for j in range(2)]}}


def test_a_prepared_tfds_dataset_is_a_source_with_one_example_per_caption(tmp_path, own_tempdir):
    # This builder stands in for a published tfds dataset, so tfds looks for it on GCS through a temporary folder
    # it never removes: own_tempdir keeps that under tmp_path.
    TinyCaptionsCatalogue(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
    report = build_dataset("tfds:tiny_captions_catalogue", tmp_path / "out", data_dir=str(tmp_path / "tfds"),
                           caption_key="captions/text", all_captions=True, verbose=False)
    assert report.kept == 6 and report.skipped == {"smaller than 64 px": 2}
    first = build_dataset(f"tfds:{tmp_path / 'tfds' / 'tiny_captions_catalogue' / '1.0.0'}", tmp_path / "out2",
                          caption_key="captions/text", verbose=False)
    assert first.kept == 3
    assert {ex["caption"].decode() for ex in read_all(tmp_path / "out2").values()} == \
        {f"image {i} caption 0" for i in range(3)}


def test_cli_build_writes_the_dataset_and_refuses_to_overwrite_silently(messy_folder, tmp_path, capsys):
    assert cli.main(["data", "build", "--source", str(messy_folder), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "21 example(s) seen, 15 kept, 6 skipped" in printed and "truncated image" in printed
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli.main(["data", "build", "--source", str(messy_folder), "--out", str(tmp_path / "out")])
    assert cli.main(["data", "build", "--source", str(messy_folder), "--out", str(tmp_path / "out"),
                     "--overwrite", "--min-size", "90"]) == 0
    assert load_report(tmp_path / "out").kept == 2


def test_host_shards_are_the_examples_of_tfds_even_splits(messy_folder, tmp_path):
    build_dataset(messy_folder, tmp_path / "out", verbose=False)
    builder = load_dataset(tmp_path / "out")
    full = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    keys = [full[i]["key"] for i in range(len(full))]
    for count in (2, 3, 4):
        for p in range(count):
            part = builder.as_data_source(tfds.even_splits("train", count)[p],
                                          decoders={"image": tfds.decode.SkipDecoding()})
            start, end = host_range(len(full), p, count)
            assert [part[i]["key"] for i in range(len(part))] == keys[start:end]
