"""Captioned shapes scenes: the demo model's dataset, and the attribute grammar its evaluation checks.

    scene = sample_scene(rng)                   # one or two shapes, named colours, sizes, positions, background
    image = render(scene, size=64)              # (64, 64, 3) uint8, anti-aliased
    caption(scene)                              # "a small red circle at the top left on a blue background"
    build_shapes_dataset("data/shapes", train=30000)   # TFDS (ArrayRecord): train / test / heldout splits

Everything is a pure function of a seed: scene i of a split is drawn from np.random.default_rng([seed, split, i]).
Captions always name each shape's colour and kind and the background; a shape's size and position are left out
of the caption with probability `omit` each (0.15; 0.5 in the prior's dataset), so short prompts ("a red circle on
a blue background") are in distribution; `omit` changes the captions only, never the scenes or their images. Some
(colour, shape) pairs are held out of `train` and `test` and make up the `heldout` split: the model never sees,
say, a red triangle, so the heldout figures measure how it composes attributes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (35, 70, 220), "yellow": (240, 210, 30),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.30}          # side of the shape's bounding box, as a fraction of the image
# Named positions: (row, column) of a 3 x 3 grid, and the caption's phrase for each.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
OMIT = 0.15   # the probability that a caption leaves out a shape's size, and (independently) its position
SPLITS = {"train": 0, "test": 1, "heldout": 2}
NAME = "shapes_scenes"


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str                 # circle | square | triangle
    color: str
    size: str                 # small | large
    position: str             # a key of POSITIONS
    center: tuple[float, float]   # (y, x) in [0, 1], the jittered centre
    say_size: bool = True
    say_position: bool = True


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Scene":
        d = json.loads(text)
        return cls(d["background"], tuple(Shape(**{**s, "center": tuple(s["center"])}) for s in d["shapes"]))


def is_held_out(scene: Scene) -> bool:
    return any((s.color, s.kind) in HELD_OUT for s in scene.shapes)


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def shape_phrase(s: Shape) -> str:
    words = ["a"] + ([s.size] if s.say_size else []) + [s.color, s.kind]
    if s.say_position:
        words.append(position_phrase(s.position))
    return " ".join(words)


def caption(scene: Scene) -> str:
    return " and ".join(shape_phrase(s) for s in scene.shapes) + f" on a {scene.background} background"


def _pairs(held_out: bool | None) -> list[tuple[str, str]]:
    pairs = [(c, k) for c in COLORS for k in SHAPES]
    if held_out is None:
        return pairs
    return [p for p in pairs if (p in HELD_OUT) == held_out]


def sample_scene(rng: np.random.Generator, *, held_out: bool = False, max_shapes: int = 2,
                 two_shape_prob: float = 0.3, omit: float = OMIT, jitter: float = 0.8) -> Scene:
    """A random scene. held_out=False: every (colour, shape) pair is a training pair; True: exactly one shape,
    of a held-out pair. jitter: how much of the slack inside its grid cell a shape's centre may move."""
    n = 1 if held_out or max_shapes == 1 or rng.random() >= two_shape_prob else 2
    pairs = _pairs(held_out)
    background = list(COLORS)[rng.integers(len(COLORS))]
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    shapes, used = [], {background}
    for i in range(n):
        options = [p for p in pairs if p[0] not in used]
        color, kind = options[rng.integers(len(options))]
        used.add(color)
        size = list(SIZES)[rng.integers(len(SIZES))]
        position = list(POSITIONS)[positions[i]]
        row, col = POSITIONS[position]
        slack = (1 / 3 - SIZES[size]) / 2 * jitter
        cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
        cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
        shapes.append(Shape(kind, color, size, position, (float(cy), float(cx)),
                            say_size=bool(rng.random() >= omit), say_position=bool(rng.random() >= omit)))
    return Scene(background, tuple(shapes))


def render(scene: Scene, size: int = 64, supersample: int = 4) -> np.ndarray:
    """(size, size, 3) uint8: drawn at `supersample` x the size, then box-filtered down (anti-aliased edges)."""
    from PIL import Image, ImageDraw
    big = size * supersample
    im = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(im)
    for s in scene.shapes:
        half = SIZES[s.size] * big / 2
        cy, cx = s.center[0] * big, s.center[1] * big
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:  # an upright isosceles triangle filling the box
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return np.asarray(im.resize((size, size), Image.BOX), np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG-encoded bytes (tfds stores encoded images as they are; encoding itself would need TensorFlow)."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def _check_omit(omit: float) -> None:
    if not 0 <= omit <= 1:
        raise ValueError(f"omit={omit}; expected a probability in [0, 1]")


def split_scenes(split: str, count: int, seed: int = 0, omit: float = OMIT) -> Iterator[Scene]:
    """The split's scenes, in order: `train` and `test` from the training pairs, `heldout` from the held-out ones.
    `omit` changes only which sizes and positions the captions say: the scenes (and images) stay the same."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {', '.join(SPLITS)}")
    _check_omit(omit)
    for i in range(count):
        rng = scene_rng(seed, split, i)
        if split == "heldout":
            yield sample_scene(rng, held_out=True, omit=omit)
        else:
            yield sample_scene(rng, omit=omit)


# ----------------------------------------------------------------------------------------------- TFDS

def _builder_class():
    import tensorflow_datasets as tfds

    class ShapesScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Captioned shapes scenes (unclip_jax.demo.shapes); the features of `unclip-jax data build`'s datasets
        (image, caption, key, width, height) plus `scene`, the JSON of the scene's attributes."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "One or two shapes of 6 colours, 3 kinds, 2 sizes, 9 positions; held-out pairs."}
        code_path = None  # generated, nothing to download: no checksums file next to the code

        def __init__(self, *, data_dir, counts: dict, seed: int = 0, image_size: int = 64, omit: float = OMIT,
                     progress: bool = True):
            self._counts, self._seed, self._size, self._progress = counts, seed, image_size, progress
            self._omit = omit
            super().__init__(data_dir=data_dir, file_format="array_record")

        def _info(self):
            from unclip_jax.data.builders import LocalDatasetInfo
            return LocalDatasetInfo(
                builder=self,
                description=(f"Captioned shapes scenes, {self._size}x{self._size}, seed {self._seed}, captions "
                             f"omitting a size or position with probability {self._omit}; held-out (colour, shape) "
                             f"pairs: {sorted(HELD_OUT)}."),
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                    "width": tfds.features.Scalar(np.int32),
                    "height": tfds.features.Scalar(np.int32),
                    "scene": tfds.features.Text(),
                }))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in self._counts.items() if n}

        def _generate_examples(self, split: str, count: int):
            from tqdm.auto import tqdm
            scenes = split_scenes(split, count, self._seed, self._omit)
            for i, scene in enumerate(tqdm(scenes, total=count, desc=f"shapes {split}", disable=not self._progress)):
                key = f"{split}/{i:07d}"
                yield key, {"image": png_bytes(render(scene, self._size)), "caption": caption(scene), "key": key,
                            "width": np.int32(self._size), "height": np.int32(self._size), "scene": scene.to_json()}

    return ShapesScenes


def build_shapes_dataset(out: str | os.PathLike, *, train: int = 30000, test: int = 1000, heldout: int = 1000,
                         seed: int = 0, image_size: int = 64, omit: float = OMIT, overwrite: bool = False,
                         progress: bool = True) -> Path:
    """Writes the dataset under `out` (readable by unclip_jax.data.load_dataset and the trainer's sources);
    returns the version folder. Building the same arguments twice gives the same bytes. omit: how often a caption
    leaves a shape's size, or its position, unsaid (the images do not depend on it)."""
    _check_omit(omit)   # before an existing dataset is deleted
    import shutil
    import tempfile
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to rebuild it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    builder = _builder_class()(data_dir=out, counts={"train": train, "test": test, "heldout": heldout}, seed=seed,
                               image_size=image_size, omit=omit, progress=progress)
    with tempfile.TemporaryDirectory() as nothing_to_download:
        builder.download_and_prepare(download_dir=nothing_to_download)
    return Path(builder.data_dir)


def all_captions(split: str, count: int, seed: int = 0, omit: float = OMIT) -> list[str]:
    return [caption(s) for s in split_scenes(split, count, seed, omit)]
