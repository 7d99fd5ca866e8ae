"""One image-caption pair in, a clean 8-bit RGB JPEG/PNG and its caption out, or the reason it was skipped.

Nothing is dropped silently: `Skip(reason)` names why an example is left out, and `Cleaned.conversions` names
every change made to an image that is kept (grayscale -> RGB, alpha composited on white, CMYK -> RGB, 16-bit ->
8-bit, EXIF rotation, ...). The builder counts both and reports them at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

KEEP_FORMATS = ("JPEG", "PNG")  # formats stored byte-for-byte when the image needs no conversion
JPEG_QUALITY = 95


class Skip(Exception):
    """An example that is left out; `reason` is the line it is counted under in the build report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    """min_size: skip images whose shorter side is below it (px); max_size: shrink images whose shorter side is
    above it (px, None keeps the original resolution); max_aspect: skip images more elongated than this
    (long side / short side, None keeps all)."""
    min_size: int = 64
    max_size: int | None = None
    max_aspect: float | None = None
    jpeg_quality: int = JPEG_QUALITY

    def __post_init__(self):
        if self.min_size < 1:
            raise ValueError(f"min_size={self.min_size}; expected >= 1 px")
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size={self.max_size} is smaller than min_size={self.min_size}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect={self.max_aspect}; expected >= 1 (long side / short side)")


@dataclasses.dataclass(frozen=True)
class Cleaned:
    data: bytes                    # encoded 8-bit RGB image (JPEG or PNG)
    width: int
    height: int
    conversions: tuple[str, ...]   # what was changed, for the report; () when stored byte-for-byte


def clean_caption(caption) -> str:
    """str or bytes -> stripped caption; Skip for a missing, empty or undecodable one."""
    if caption is None:
        raise Skip("missing caption")
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("caption is not UTF-8") from None
    caption = str(caption).replace("\x00", "").strip()
    if not caption:
        raise Skip("empty caption")
    return caption


def _open(data: bytes) -> tuple[Image.Image, bool]:
    """-> (loaded image, whether the file held 16 bits per channel that Pillow already reduced to 8)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            wide = _wide_rgb(image)
            image.load()
        return image, wide
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip("image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise Skip("unreadable image") from None
    except OSError as e:
        raise Skip("truncated image" if "truncated" in str(e).lower() else "unreadable image") from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error):  # Pillow's parsers on garbage
        raise Skip("unreadable image") from None


def _wide_rgb(image: Image.Image) -> bool:
    """48/64-bit RGB(A) PNGs: Pillow decodes them to 8-bit modes itself, so only the raw mode tells."""
    return image.mode in ("RGB", "RGBA") and any("16" in str(t[3]) for t in (image.tile or []))


def _orientation(image: Image.Image):
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a corrupt EXIF block
        return None


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any Pillow mode -> (8-bit RGB image, list of conversions made)."""
    mode, notes = image.mode, []
    if mode == "RGB":
        return image, notes
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(image).astype(np.float64)
        if mode != "I" or a.max(initial=0) > 255:  # 32-bit "I" from PNG is 16-bit data
            a = a / 257.0
        image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
        notes.append("16-bit -> 8-bit")
        mode = "L"
    if mode == "F":
        raise Skip("unsupported image mode F (floating point)")
    if mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette -> RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
        notes.append("alpha -> composited on white")
        return image, notes
    if mode in ("L", "1"):
        notes.append("grayscale -> RGB")
    elif mode == "CMYK":
        notes.append("CMYK -> RGB")
    elif mode != "RGB":
        notes.append(f"{mode} -> RGB")
    return image.convert("RGB"), notes


def clean_image(data: bytes, options: CleanOptions = CleanOptions()) -> Cleaned:
    """Encoded image bytes -> Cleaned (8-bit RGB, checked, converted where needed) or Skip(reason)."""
    if not data:
        raise Skip("empty image file")
    image, wide = _open(data)
    source_format = image.format
    notes = ["16-bit -> 8-bit"] if wide else []
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        notes.append("multi-frame -> first frame")
    if _orientation(image) not in (None, 1):
        try:
            image = ImageOps.exif_transpose(image)
            notes.append("EXIF orientation applied")
        except Exception:  # a corrupt EXIF block: keep the pixels as stored
            pass
    w, h = image.size
    if min(w, h) < options.min_size:
        raise Skip(f"smaller than {options.min_size} px")
    if options.max_aspect is not None and max(w, h) / min(w, h) > options.max_aspect:
        raise Skip(f"aspect ratio above {options.max_aspect:g}")
    image, mode_notes = to_rgb(image)
    notes += mode_notes
    if options.max_size is not None and min(w, h) > options.max_size:
        scale = options.max_size / min(w, h)
        w, h = max(options.max_size, round(w * scale)), max(options.max_size, round(h * scale))
        image = image.resize((w, h), Image.BICUBIC)
        notes.append(f"resized to shorter side {options.max_size}")
    if not notes and source_format in KEEP_FORMATS:
        return Cleaned(data, w, h, ())
    if not notes:
        notes.append(f"{source_format or 'unknown format'} -> JPEG")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=options.jpeg_quality)
    return Cleaned(out.getvalue(), w, h, tuple(notes))



# ------------------------------------------------------------------------------------------------ report

@dataclasses.dataclass
class BuildReport:
    """What a build saw, kept, converted and skipped, by reason; `seen == kept + sum(skipped.values())`.

    ignored: files that are not examples (unknown extensions, unused side-cars), by kind; samples: the first
    keys skipped for each reason, so a user can look at them.
    """
    source: str = ""
    seen: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ignored: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    samples: dict = dataclasses.field(default_factory=dict)

    MAX_SAMPLES = 5

    def skip(self, key: str, reason: str) -> None:
        self.seen += 1
        self.skipped[reason] += 1
        shown = self.samples.setdefault(reason, [])
        if len(shown) < self.MAX_SAMPLES:
            shown.append(key)

    def keep(self, conversions=()) -> None:
        self.seen += 1
        self.kept += 1
        for c in conversions:
            self.converted[c] += 1

    def ignore(self, what: str) -> None:
        self.ignored[what] += 1

    def to_dict(self) -> dict:
        return {"source": self.source, "seen": self.seen, "kept": self.kept, "skipped": dict(self.skipped),
                "converted": dict(self.converted), "ignored": dict(self.ignored), "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict) -> "BuildReport":
        return cls(d.get("source", ""), d["seen"], d["kept"], collections.Counter(d["skipped"]),
                   collections.Counter(d["converted"]), collections.Counter(d.get("ignored", {})),
                   dict(d.get("samples", {})))

    def summary(self) -> str:
        lines = [f"{self.source}: {self.seen} example(s) seen, {self.kept} kept, "
                 f"{sum(self.skipped.values())} skipped"]
        for title, counter in (("skipped", self.skipped), ("converted (kept)", self.converted),
                               ("ignored files", self.ignored)):
            if counter:
                lines.append(f"  {title}:")
                for reason, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
                    shown = self.samples.get(reason) if title == "skipped" else None
                    lines.append(f"    {n:>9}  {reason}" + (f"  (e.g. {', '.join(shown[:3])})" if shown else ""))
        return "\n".join(lines)
