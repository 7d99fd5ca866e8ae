"""`unclip-jax evaluate`: how well a model draws the demo's shapes scenes, in three independent measures.

    report = evaluate("demo", out="eval/")       # or: unclip-jax evaluate --model demo --out eval/
    check(render(scene), scene)                  # {"background": True, "count": True, "color": True, ...}

1. Pixel checks, no network involved: `analyze(image)` reads the background colour and every shape's colour,
   kind, size and position straight off the pixels, and `check(image, scene)` says which of the scene's
   attributes the image gets right (size and position only where the caption names them).
2. CLIP R-precision with the model's own CLIP: each image's caption ranked against k - 1 other captions of the
   evaluation by cosine similarity; the top-1 rate, for the generated images and for real renders of the same
   scenes (the ceiling: captions that leave the size or position out fit several renders).
3. Frechet distance between the CLIP image embeddings of the generated images and of real renders of the same
   scenes, next to the distance between two disjoint sets of real renders (the noise floor at that sample size).

With decoder_only=True (`--decoder-only`) every measure is also taken of images decoded straight from the real
renders' CLIP image embeddings ("decoded": the prior skipped, the empty prompt, as image variations are made), so
a model's errors can be told apart: what the decoded images get wrong, the decoder (or the CLIP embedding) does;
what only the generated ones get wrong, the prior does. It also probes what the decoder reads from the embedding
(`embedding_use`): its one-step x0 estimates from real renders noised to t = 300, 600, 800, pixel-checked, given
each render's own embedding and another scene's. An attribute that scores the same with both is not taken from
the embedding; the shipped demo decoder takes colour and shape from it (at t = 800: colour 0.89 vs 0.20,
shape 0.70 vs 0.25 on the 256 held-in scenes).

Scenes come in four groups: `heldin` (one shape, training (colour, shape) pairs, drawn from the `test` split's
seeds), `heldout` (the `heldout` split: one shape of a pair never trained on), `two_shape` (two shapes of
training pairs) and `short` (the first `heldin` scenes again, captioned without size or position: "a red circle on
a blue background", the shortest prompt a user types), each scored separately.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np

from unclip_jax.demo import shapes
from unclip_jax.demo.shapes import COLORS, POSITIONS, SIZES, Scene, Shape

GROUPS = ("heldin", "heldout", "two_shape", "short")
ATTRIBUTES = ("background", "count", "color", "shape", "size", "position", "all")

# ---------------------------------------------------------------------------------------------- pixel analysis

# A shape's kind from its coverage: `fill` = area / bounding box (square 1, circle pi / 4, triangle 1 / 2) and
# `skew` = minus the skewness of the area's distribution over rows (0 for the symmetric shapes, 0.57 for an upright
# triangle, whose rows widen downwards; blur keeps the third cumulant, so it stays well above 0.25 at 64 px).
TRIANGLE_SKEW, TRIANGLE_FILL, SQUARE_FILL = 0.25, 0.64, 0.89
NOISE_FLOOR = 0.15  # coverage below this is noise; the map is stretched symmetrically about 1 / 2 (edges keep sums)
MIN_AREA = 0.25     # a component smaller than this fraction of the smallest shape (a small triangle) is a speck,
MIN_SIDE, MIN_FILL = 0.5, 0.3   # and so is one narrower than half a small shape, or one filling under 0.3 of its box


@dataclasses.dataclass(frozen=True)
class Detection:
    """One shape found in an image: `shape` (its size and position read off the pixels, centre (y, x) in [0, 1])
    and the measurements behind it: area and extent (height, width) as fractions of the image, fill, skew."""
    shape: Shape
    area: float
    extent: tuple[float, float]
    fill: float
    skew: float


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What `analyze` sees: the background colour's name and the shapes, largest first."""
    background: str
    detections: tuple[Detection, ...]

    @property
    def scene(self) -> Scene:
        """The detected scene (every size and position said): `shapes.caption(analysis.scene)` describes it."""
        return Scene(self.background, tuple(d.shape for d in self.detections))


def as_uint8(image) -> np.ndarray:
    """An (H, W, 3) image as uint8: uint8 as it is, floats taken to be in [0, 1]; a clear error otherwise."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3 or min(a.shape[:2]) < 8:
        raise ValueError(f"expected one RGB image of shape (H, W, 3) with H, W >= 8, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    raise ValueError(f"expected a uint8 image or floats in [0, 1], got dtype {a.dtype}")


def _nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda n: float(np.sum((np.asarray(COLORS[n], np.float32) - rgb) ** 2)))


def _blend(img: np.ndarray, bg: np.ndarray, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel as a mix of the background and each colour: (coverage t, distance from the segment bg-colour),
    (H, W, K) each. An anti-aliased or blurred edge pixel lies on the segment of its own shape's colour."""
    d = colors - bg                                                   # (K, 3)
    p = img - bg                                                      # (H, W, 3)
    t = p @ d.T / np.sum(d * d, -1)                                   # (H, W, K)
    r = np.linalg.norm(p[..., None, :] - np.clip(t, 0, 1)[..., None] * d, axis=-1)
    return t, r


def _measure(alpha: np.ndarray, color: str) -> Detection:
    """A shape's measurements from its coverage map (H, W) in [0, 1], sub-pixel: the bounding box's sides are
    the sums of the row- and column-wise maximum coverage."""
    h_px, w_px = alpha.shape
    rows, cols = alpha.max(1), alpha.max(0)
    h, w, area = rows.sum(), cols.sum(), alpha.sum()
    y, x = np.arange(h_px) + 0.5, np.arange(w_px) + 0.5
    cy, cx = y @ rows / h, x @ cols / w                               # the bounding box's centre
    mass = alpha.sum(1) / area                                        # the area's distribution over rows
    mean = y @ mass
    var, third = (y - mean) ** 2 @ mass, (y - mean) ** 3 @ mass
    fill, skew = area / (h * w), -third / max(var, 1e-6) ** 1.5
    kind = ("triangle" if skew > TRIANGLE_SKEW or fill < TRIANGLE_FILL else
            "square" if fill > SQUARE_FILL else "circle")
    side = (h / h_px + w / w_px) / 2
    size = min(SIZES, key=lambda s: abs(SIZES[s] - side))
    cell = (min(int(3 * cy / h_px), 2), min(int(3 * cx / w_px), 2))
    position = next(p for p, rc in POSITIONS.items() if rc == cell)
    return Detection(Shape(kind, color, size, position, (float(cy / h_px), float(cx / w_px))),
                     float(area / alpha.size), (float(h / h_px), float(w / w_px)), float(fill), float(skew))


def analyze(image) -> Analysis:
    """Reads a shapes scene off the pixels of an (H, W, 3) image (uint8, or floats in [0, 1]; any size).

    Background: the median of the border pixels, named by the nearest palette colour. Each other pixel is a mix
    of the background and one palette colour (the one whose background-to-colour segment it lies closest to);
    the pixels at least half covered by a colour make up its shapes: connected components, specks (small, thin
    or sparse ones) dropped. Each shape's coverage map then gives its kind (fill and skew), size (bounding box
    side, nearest of SIZES) and position (the cell of the 3 x 3 grid that holds the box's centre).
    """
    from scipy import ndimage
    img = as_uint8(image).astype(np.float32)
    height, width, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    background = _nearest_color(bg)
    names = [n for n in COLORS if n != background]
    t, r = _blend(img, bg, np.asarray([COLORS[n] for n in names], np.float32))
    best = r.argmin(-1)                                               # each pixel's colour, then its coverage
    label = np.where(np.take_along_axis(t, best[..., None], -1)[..., 0] >= 0.5, best, -1)
    min_area = MIN_AREA * SIZES["small"] ** 2 / 2 * height * width
    detections = []
    for k, name in enumerate(names):
        components, n = ndimage.label(label == k, structure=np.ones((3, 3)))
        areas = np.bincount(components.ravel(), minlength=n + 1)
        for j in np.flatnonzero(areas[1:] >= min_area) + 1:
            mask = components == j
            color = np.median(img[mask], axis=0)                      # the shape's own shade of its colour
            region = ndimage.binary_dilation(mask, iterations=2) & ((label == k) | (label == -1))
            coverage = _blend(img, bg, color[None])[0][..., 0]
            coverage = np.clip((coverage - NOISE_FLOOR) / (1 - 2 * NOISE_FLOOR), 0, 1)  # symmetric about 1 / 2
            d = _measure(np.where(region, coverage, 0.0), name)
            if min(d.extent) >= MIN_SIDE * SIZES["small"] and d.fill >= MIN_FILL:
                detections.append(d)
    return Analysis(background, tuple(sorted(detections, key=lambda d: -d.area)))


def check(image, scene: Scene) -> dict:
    """Which of `scene`'s attributes an image (or its `analyze` result) gets right.

    Returns {"background", "count" (as many shapes as the scene), "color", "shape", "size", "position", "all",
    "shapes"}: "shapes" holds one {"color", "shape", "size", "position"} per scene shape, matched to the detected
    shape of its colour (else to the largest one left); size and position are None where the caption leaves them
    out. The top-level color / shape / size / position hold for every shape of the scene (None: none checked);
    "all": every checked attribute, background and count included.
    """
    analysis = image if isinstance(image, Analysis) else analyze(image)
    left, matched = list(analysis.detections), []
    for s in scene.shapes:
        matched.append(next((d for d in left if d.shape.color == s.color), None))
        if matched[-1] is not None:
            left.remove(matched[-1])
    matched = [d if d is not None else left.pop(0) if left else None for d in matched]
    per_shape = []
    for s, d in zip(scene.shapes, matched):
        got = d.shape if d is not None else None
        per_shape.append({"color": got is not None and got.color == s.color,
                          "shape": got is not None and got.kind == s.kind,
                          "size": (got is not None and got.size == s.size) if s.say_size else None,
                          "position": (got is not None and got.position == s.position) if s.say_position else None})
    out = {"background": analysis.background == scene.background,
           "count": len(analysis.detections) == len(scene.shapes)}
    for a in ("color", "shape", "size", "position"):
        said = [p[a] for p in per_shape if p[a] is not None]
        out[a] = all(said) if said else None
    out["all"] = all(v for v in out.values() if v is not None)
    out["shapes"] = per_shape
    return out


def pixel_rates(checks: list[dict]) -> dict[str, float | None]:
    """Accuracy per attribute over `check` results: background, count and all per image; colour, shape, size and
    position per shape (size and position over the shapes whose caption names them). None where nothing counts."""
    def rate(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None
    out = {a: rate(c[a] for c in checks) for a in ("background", "count", "all")}
    out.update({a: rate(s[a] for c in checks for s in c["shapes"]) for a in ("color", "shape", "size", "position")})
    return {a: out[a] for a in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------- CLIP metrics

def r_precision_hits(image_embeds, text_embeds, targets, *, k: int = 32, seed: int = 0) -> np.ndarray:
    """(N,) bool: whether each image's own caption beats k - 1 others by cosine similarity (ties lose).

    image_embeds (N, D); text_embeds (P, D), one row per distinct caption of the pool; targets (N,) ints, each
    image's caption's row. Image i's k - 1 rivals are drawn without replacement from the other rows by
    np.random.default_rng([seed, i]): the same rivals for the i-th image of any set scored with the same seed.
    k is capped at P (the report records the k used).
    """
    image_embeds, text_embeds = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    targets = np.asarray(targets, np.int64)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected image_embeds (N, D) and text_embeds (P, D), got {image_embeds.shape} and "
                         f"{text_embeds.shape}")
    if targets.shape != (len(image_embeds),) or (len(targets) and not 0 <= targets.min() <= targets.max()
                                                  < len(text_embeds)):
        raise ValueError(f"targets must be {len(image_embeds)} row indices into text_embeds (P = {len(text_embeds)})")
    k = min(k, len(text_embeds))
    if k < 2:
        raise ValueError(f"R-precision needs k >= 2 distinct captions, got k = {k}")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = unit(image_embeds) @ unit(text_embeds).T
    hits = np.zeros(len(targets), bool)
    for i, t in enumerate(targets):
        rivals = np.random.default_rng([seed, i]).choice(len(text_embeds) - 1, k - 1, replace=False)
        rivals += rivals >= t                                         # every row but the target's
        hits[i] = sims[i, t] > sims[i, rivals].max()
    return hits


def frechet_distance(x, y, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two sets of embeddings (N, D) and (M, D), as FID computes it:
    |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)). Where the product's square root is not finite (singular
    covariances), eps is added to both diagonals; the root's imaginary part (rounding) is dropped."""
    from scipy import linalg
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"expected two sets of embeddings (N, D) and (M, D) with N, M >= 2, got {x.shape} and "
                         f"{y.shape}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():  # "singular matrix": the rule with fewer samples than dimensions, and handled
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_x @ s_y)
        if not np.isfinite(root).all():
            offset = np.eye(len(s_x)) * eps
            root = linalg.sqrtm((s_x + offset) @ (s_y + offset))
    distance = np.sum((mu_x - mu_y) ** 2) + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(np.real(root))
    return float(max(distance, 0.0))


def _pad(x: np.ndarray | list, n: int):
    """The first axis filled up to n by repeating the last row: one batch shape, one compilation."""
    if isinstance(x, list):
        return x + x[-1:] * (n - len(x))
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), 0)]) if len(x) < n else x


def _padded_map(fn, *arrays, batch_size: int) -> np.ndarray:
    """fn over `batch_size` rows of the arrays at a time (the last batch padded: one compiled function), the
    outputs' rows for the real rows, concatenated."""
    out = []
    for lo in range(0, len(arrays[0]), batch_size):
        n = min(batch_size, len(arrays[0]) - lo)
        out.append(np.asarray(fn(*(_pad(a[lo:lo + n], batch_size) for a in arrays)))[:n])
    return np.concatenate(out)


class ClipSpace:
    """A model's CLIP towers as two batched functions, uint8 images (N, H, W, 3) or captions -> embeddings (N, D),
    preprocessed exactly as `unclip-jax data embed` preprocesses the training data (PNG, the image processor)."""

    def __init__(self, towers, batch_size: int = 64):
        import jax
        from unclip_jax.data.embed import clip_pixels, tokenize
        self.towers, self.batch_size, self._pixels, self._tokenize = towers, batch_size, clip_pixels, tokenize
        self._image = jax.jit(lambda p, x: towers.image.apply({"params": p}, x).image_embeds)
        self._text = jax.jit(lambda p, ids, mask: towers.text.apply({"params": p}, ids, mask).text_embeds)

    def images(self, images) -> np.ndarray:
        pixels = np.stack([self._pixels(self.towers.processor, shapes.png_bytes(as_uint8(im))) for im in images])
        return self._batched(lambda x: self._image(self.towers.image_params, x), pixels)

    def texts(self, captions: list[str]) -> np.ndarray:
        ids, mask, _ = self._tokenize(self.towers.tokenizer, captions, self.towers.text_len)
        return self._batched(lambda i, m: self._text(self.towers.text_params, i, m), ids, mask)

    def _batched(self, fn, *arrays) -> np.ndarray:
        return np.asarray(_padded_map(fn, *arrays, batch_size=self.batch_size), np.float32)


# ---------------------------------------------------------------------------------------------- the evaluation

TWO_SHAPE_INDEX, REFERENCE_INDEX = 1_000_000, 2_000_000   # scene index offsets: disjoint streams of one split


def eval_scenes(group: str, count: int, seed: int = 0, *, reference: bool = False) -> list[Scene]:
    """The evaluation's scenes of a group, in order (see the module doc); reference=True: as many other scenes
    from the same distribution, disjoint from those (the real-vs-real baseline of the Frechet distance)."""
    offset = REFERENCE_INDEX if reference else 0
    if group == "heldin":
        return [shapes.sample_scene(shapes.scene_rng(seed, "test", offset + i), max_shapes=1) for i in range(count)]
    if group == "short":
        return [dataclasses.replace(scene, shapes=tuple(dataclasses.replace(s, say_size=False, say_position=False)
                                                        for s in scene.shapes))
                for scene in eval_scenes("heldin", count, seed, reference=reference)]
    if group == "two_shape":
        return [shapes.sample_scene(shapes.scene_rng(seed, "test", TWO_SHAPE_INDEX + offset + i), two_shape_prob=1.0)
                for i in range(count)]
    if group == "heldout":
        return [shapes.sample_scene(shapes.scene_rng(seed, "heldout", offset + i), held_out=True)
                for i in range(count)]
    raise ValueError(f"group={group!r}; expected one of {', '.join(GROUPS)}")


def _folder_name(root) -> str:
    """The evaluated folder as the report records it: the packaged demo model by its place in the package (not
    this machine's path), anything else as given."""
    from unclip_jax.demo import MODEL_DIR
    return "unclip_jax/demo/model" if Path(root).resolve() == MODEL_DIR else str(root)


def _batched(call, items, *, batch_size: int, seed: int, progress: bool, desc: str) -> np.ndarray:
    """call(batch, key) -> images for every `batch_size` items (the last batch padded: one compiled function),
    batch b keyed fold_in(key(seed), b); the images of the items, concatenated, with a progress bar."""
    import jax
    from tqdm.auto import tqdm
    key, out = jax.random.key(seed), []
    with tqdm(total=len(items), unit="img", desc=desc, disable=not progress) as bar:
        for b, lo in enumerate(range(0, len(items), batch_size)):
            chunk = items[lo:lo + batch_size]
            out.append(call(_pad(chunk, batch_size), jax.random.fold_in(key, b))[:len(chunk)])
            bar.update(len(chunk))
    return np.concatenate(out)


def generate(pipe, captions: list[str], *, batch_size: int, seed: int = 0, progress: bool = True, best_of: int = 1,
             **kwargs) -> np.ndarray:
    """Images (N, H, W, 3) float in [0, 1] for the captions, `batch_size` prompts per pipeline call (the last
    batch padded: one compiled function), batch b drawn with the key fold_in(key(seed), b). best_of > 1: the
    paper's best-of-N prior (`sample_best_of_n`). kwargs: the pipeline's sampling arguments (steps, guidance
    scales)."""
    if best_of > 1:
        call = lambda batch, key: pipe.sample_best_of_n(batch, n=best_of, rng=key, output_type="np", **kwargs).images
    else:
        call = lambda batch, key: pipe(batch, rng=key, output_type="np", **kwargs).images
    return _batched(call, captions, batch_size=batch_size, seed=seed, progress=progress, desc="generating")


def decode(pipe, image_embeddings: np.ndarray, *, batch_size: int, seed: int = 0, progress: bool = True,
           **kwargs) -> np.ndarray:
    """Images (N, H, W, 3) float in [0, 1] decoded from CLIP image embeddings (N, D) by an image-variation
    pipeline, batched and keyed as `generate` does. kwargs: the pipeline's decoder and super-res arguments."""
    return _batched(lambda batch, key: pipe(image_embeddings=batch, rng=key, output_type="np", **kwargs).images,
                    image_embeddings, batch_size=batch_size, seed=seed, progress=progress, desc="decoding")


PROBE_TIMESTEPS = (300, 600, 800)


def embedding_use(pipe, real: list, real_embeds: np.ndarray, scenes: list[Scene], *, batch_size: int, seed: int = 0,
                  timesteps=PROBE_TIMESTEPS, swap: np.ndarray | None = None) -> dict:
    """What the decoder takes from the CLIP image embedding: the real renders, resized to the decoder's size,
    noised to each t (one noise draw per t), and the decoder's one-step x0 estimate given the render's own
    embedding ("true") or another scene's ("swapped"; empty prompt for both), pixel-checked against the
    render's scene. An attribute the decoder reads from the embedding scores well with the true embedding and
    drops towards chance with the swapped one; one it only reads off the noisy image scores the same with both.

    pipe: an image-variation pipeline (stages + params); real: the renders (uint8, any size); real_embeds: their
    CLIP image embeddings (N, D); swap: which embedding each render gets as "swapped" (default: the next one's).
    Returns {"t<t>": {"true": [check per render], "swapped": [...]}}; `pixel_rates` of each list gives the rates.
    """
    import jax
    import jax.numpy as jnp

    from unclip_jax.diffusion import scheduler as sch
    from unclip_jax.manipulations.ddim import decoder_model
    st = pipe.stages
    config = st.decoder_scheduler
    state = sch.create_state(config)
    n = len(real)
    real_embeds = np.asarray(real_embeds)
    if len(real_embeds) != n or len(scenes) != n:
        raise ValueError(f"embedding_use: {n} renders, {len(real_embeds)} embeddings and {len(scenes)} scenes; "
                         "expected one of each per render")
    swap = np.roll(np.arange(n), -1) if swap is None else np.asarray(swap)
    x0 = np.asarray(pipe.decoder_pixels(list(real)))
    empty = pipe.encode_prompt([""])

    @jax.jit
    def one_step(params, empty, x0, z, t, noise):   # t traced: one compile for every t
        tb = jnp.full((x0.shape[0],), t, jnp.int32)
        x_t = sch.q_sample(state, x0, tb, noise)
        out = decoder_model(st, params, z, empty, None, 1.0, guidance=False)(x_t, tb)
        return sch.predict_x0(state, config, out, tb, x_t, clip=True)

    def estimates(z, t, noise):
        return _padded_map(lambda x, zz, e: one_step(pipe.params, empty, x, zz, np.int32(t), e), x0, z, noise,
                           batch_size=batch_size)

    result = {}
    for t in timesteps:
        noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), t), x0.shape))
        result[f"t{t}"] = {name: [check(as_uint8(e * 0.5 + 0.5), s) for e, s in zip(estimates(z, t, noise), scenes)]
                           for name, z in (("true", real_embeds), ("swapped", real_embeds[swap]))}
    return result


INT_SETTINGS = ("num_heldin", "num_heldout", "num_two_shape", "num_short", "seed", "batch_size", "best_of",
                "prior_steps", "decoder_steps", "super_res_steps", "k")


def check_settings(*, num_heldin: int, num_heldout: int, num_two_shape: int, seed: int, batch_size: int, k: int,
                   prior_steps: int, decoder_steps: int, super_res_steps: int, best_of: int = 1,
                   num_short: int = 0) -> None:
    """A ValueError naming the first bad one of evaluate's integer settings."""
    from unclip_jax.pipeline import _check_steps
    least = dict(num_heldin=0, num_heldout=0, num_two_shape=0, num_short=0, seed=0, batch_size=1, k=2, best_of=1)
    given = dict(num_heldin=num_heldin, num_heldout=num_heldout, num_two_shape=num_two_shape, num_short=num_short,
                 seed=seed, batch_size=batch_size, k=k, best_of=best_of)
    for name, n in given.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < least[name]:
            raise ValueError(f"{name} must be an int >= {least[name]}, got {n!r}")
    if not num_heldin + num_heldout + num_two_shape + num_short:
        raise ValueError("nothing to evaluate: num_heldin, num_heldout, num_two_shape and num_short are all 0")
    _check_steps(prior_steps=prior_steps, decoder_steps=decoder_steps, super_res_steps=super_res_steps)


def evaluate(model: str = "demo", *, num_heldin: int = 256, num_heldout: int = 64, num_two_shape: int = 16,
             num_short: int = 128, seed: int = 0, batch_size: int = 16, best_of: int = 1, prior_steps: int = 25,
             decoder_steps: int = 16, super_res_steps: int = 4, prior_guidance: float | None = None,
             decoder_guidance: float | None = None, k: int = 32, decoder_only: bool = False,
             out: str | Path | None = None, progress: bool = True) -> dict:
    """Generates one image per evaluation scene's caption with `model` (a diffusers unCLIP folder with the CLIP
    image tower, "demo" by default) and scores the images; returns the report (see the module doc).

    Per group: pixel-check accuracies ("pixel"), R-precision ("r_precision", k rivals) and the Frechet distance
    ("frechet"), each for the generated images and, as the reference, for real renders of the same scenes;
    decoder_only: also for images decoded from the real renders' CLIP image embeddings ("decoded"; see the module
    doc), with the same decoder settings; prior_guidance, decoder_guidance: None takes the model's own setting
    (its unclip_jax.json, as `unclip-jax sample` does), else diffusers' (4.0, 8.0);
    "samples": per generated image its caption, what the pixel analysis saw and its checks. out: a folder for
    report.json and <group>_grid.png (the generated images in caption order, row by row); progress: a progress
    bar while generating and the table printed at the end.
    """
    check_settings(num_heldin=num_heldin, num_heldout=num_heldout, num_two_shape=num_two_shape, num_short=num_short,
                   seed=seed, batch_size=batch_size, k=k, best_of=best_of, prior_steps=prior_steps,
                   decoder_steps=decoder_steps, super_res_steps=super_res_steps)
    # `short` last: the other groups' images do not depend on it (batch b's key is fold_in(key(seed), b))
    counts = {"heldin": num_heldin, "heldout": num_heldout, "two_shape": num_two_shape, "short": num_short}
    steps = dict(prior_num_inference_steps=prior_steps, decoder_num_inference_steps=decoder_steps,
                 super_res_num_inference_steps=super_res_steps)
    import unclip_jax
    from unclip_jax.convert.io import resolve_folder
    from unclip_jax.data.embed import load_towers

    t0 = time.perf_counter()
    root = resolve_folder(model)
    towers = load_towers(str(root))
    pipe = unclip_jax.UnCLIPPipeline.from_pretrained(root)
    prior_guidance, decoder_guidance = (float(g) for g in pipe._settings(prior_guidance_scale=prior_guidance,
                                                                         decoder_guidance_scale=decoder_guidance))
    scenes = {g: eval_scenes(g, n, seed) for g, n in counts.items() if n}
    scene_list = [s for g in scenes for s in scenes[g]]
    ends = np.cumsum([len(v) for v in scenes.values()])
    parts = {g: slice(int(end) - len(v), int(end)) for (g, v), end in zip(scenes.items(), ends)}  # of scene_list
    captions = [shapes.caption(s) for s in scene_list]
    t1 = time.perf_counter()
    generated = generate(pipe, captions, batch_size=batch_size, seed=seed, progress=progress, best_of=best_of,
                         prior_guidance_scale=prior_guidance, decoder_guidance_scale=decoder_guidance, **steps)
    t2 = time.perf_counter()

    size = generated.shape[1]
    real = [shapes.render(s, size) for s in scene_list]
    clip = ClipSpace(towers)
    images = {"generated": [as_uint8(im) for im in generated]}
    embeds = {"generated": clip.images(images["generated"])}
    real_embeds = clip.images(real)
    decode_s = 0.0
    if decoder_only:
        t3 = time.perf_counter()
        variations = unclip_jax.UnCLIPImageVariationPipeline.from_pretrained(root)
        decoded = decode(variations, real_embeds, batch_size=batch_size, seed=seed, progress=progress,
                         decoder_num_inference_steps=decoder_steps, super_res_num_inference_steps=super_res_steps,
                         decoder_guidance_scale=decoder_guidance)
        images["decoded"] = [as_uint8(im) for im in decoded]
        # one call for every group (one compile), each render swapped with the next of its own group
        swap = np.concatenate([np.roll(np.arange(p.start, p.stop), -1) for p in parts.values()])
        probe_checks = embedding_use(variations, real, real_embeds, scene_list, batch_size=batch_size, seed=seed,
                                     swap=swap)
        decode_s = time.perf_counter() - t3
        embeds["decoded"] = clip.images(images["decoded"])
    images["real"], embeds["real"] = real, real_embeds
    pool = sorted(set(captions))
    row = {c: i for i, c in enumerate(pool)}
    targets = np.array([row[c] for c in captions])
    text = clip.texts(pool)
    k_used = min(k, len(pool))
    hits = {kind: r_precision_hits(e, text, targets, k=k_used, seed=seed) if k_used >= 2 else None
            for kind, e in embeds.items()}
    analyses = {kind: [analyze(im) for im in ims] for kind, ims in images.items()}
    checks = {kind: [check(a, s) for a, s in zip(analyses[kind], scene_list)] for kind in analyses}

    groups, samples = {}, []
    for g, part in parts.items():
        n = part.stop - part.start
        reference = clip.images([shapes.render(s, size) for s in eval_scenes(g, n, seed, reference=True)])
        fd = lambda a, b: frechet_distance(a, b) if n >= 2 else None
        groups[g] = {
            "count": n,
            "pixel": {kind: pixel_rates(checks[kind][part]) for kind in checks},
            "r_precision": {kind: None if h is None else float(h[part].mean()) for kind, h in hits.items()},
            "frechet": {**{f"{kind}_vs_real": fd(embeds[kind][part], embeds["real"][part])
                           for kind in embeds if kind != "real"},
                        "real_vs_real": fd(embeds["real"][part], reference)},
        }
        if decoder_only:  # "swapped": None where the group has one scene (nothing to swap with)
            groups[g]["embedding_use"] = {
                t: {name: pixel_rates(c[part]) if name == "true" or n >= 2 else None for name, c in probe.items()}
                for t, probe in probe_checks.items()}
        for i in range(part.start, part.stop):
            samples.append({"group": g, "caption": captions[i],
                            "seen": shapes.caption(analyses["generated"][i].scene),
                            "check": checks["generated"][i],
                            "r_precision_hit": None if hits["generated"] is None else bool(hits["generated"][i])})
            if decoder_only:
                samples[-1].update(decoded_seen=shapes.caption(analyses["decoded"][i].scene),
                                   decoded_check=checks["decoded"][i])
    report = {
        "model": str(model), "folder": _folder_name(root), "seed": seed,
        "settings": {"batch_size": batch_size, "best_of": best_of, "prior_steps": prior_steps,
                     "decoder_steps": decoder_steps, "super_res_steps": super_res_steps,
                     "prior_guidance": prior_guidance, "decoder_guidance": decoder_guidance, "k": k_used,
                     "image_size": size, "clip_dim": int(text.shape[1]), "decoder_only": decoder_only},
        "groups": groups,
        "seconds": {"load": t1 - t0, "generate": t2 - t1, "decode": decode_s,
                    "score": time.perf_counter() - t2 - decode_s},
        "samples": samples,
    }
    if out is not None:
        from unclip_jax.images import grid
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        for g, part in parts.items():
            grid(generated[part]).save(out / f"{g}_grid.png")
            if decoder_only:
                grid(decoded[part]).save(out / f"{g}_decoded_grid.png")
    if progress:
        print(format_table(report))
        if out is not None:
            names = [f"{g}{kind}_grid.png" for g in scenes for kind in ("", "_decoded")[:1 + decoder_only]]
            print(f"wrote {out / 'report.json'} and the grids ({', '.join(names)})")
    return report


DEFAULTS = dict(evaluate.__kwdefaults__)


def format_table(report: dict) -> str:
    """The report's figures as a text table: per group, a row for the generated images and one for the real
    renders (whose Frechet distance is the real-vs-real baseline)."""
    cols = ("background", "count", "color", "shape", "size", "position", "all")
    fmt = lambda v, width: f"{'-' if v is None else f'{v:.2f}':>{width}}"
    lines = [f"{'group':<10} {'images':<9} {'n':>4} " + " ".join(f"{c[:6]:>6}" for c in cols) +
             f" {'R-prec':>6} {'Frechet':>8}"]
    for g, r in report["groups"].items():
        for kind in r["pixel"]:
            fd = r["frechet"][f"{kind}_vs_real"]
            lines.append(f"{g if kind == 'generated' else '':<10} {kind:<9} {r['count']:>4} " +
                         " ".join(fmt(r["pixel"][kind][c], 6) for c in cols) +
                         f" {fmt(r['r_precision'][kind], 6)} {fmt(fd, 8)}")
    s = report["settings"]
    lines += ["pixel checks: accuracy per attribute (size, position: where the caption says them; all: the whole "
              f"scene right). R-prec: top-1 among k={s['k']} captions",
              f"by CLIP cosine. Frechet: CLIP image embeddings ({s['clip_dim']}-d) against real renders of the same "
              "captions; on the real rows, two disjoint sets of real renders."]
    if s.get("decoder_only"):
        lines.append("decoded: the real renders' CLIP image embeddings through the decoder alone (no prior, empty "
                     "prompt).")
        probes = {g: r["embedding_use"] for g, r in report["groups"].items() if "embedding_use" in r}
        if probes:
            lines.append("embedding use: colour / shape of the decoder's one-step x0 from real renders noised to t, "
                         "given their own CLIP embedding (true) or another scene's (swapped):")
            for g, probe in probes.items():
                lines.append(f"  {g:<10} " + "   ".join(
                    f"{t}: true {fmt(r['true']['color'], 4)} / {fmt(r['true']['shape'], 4)}, "
                    f"swapped {fmt((r['swapped'] or {}).get('color'), 4)} / "
                    f"{fmt((r['swapped'] or {}).get('shape'), 4)}"
                    for t, r in probe.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the command

def add_subcommand(subparsers) -> None:
    """Adds `evaluate` to an argparse subparsers object (defaults: evaluate's)."""
    from unclip_jax.pipeline import KARLO_SETTINGS
    d = DEFAULTS
    p = subparsers.add_parser("evaluate", help="score a model on the demo's shapes scenes: pixel checks, "
                              "CLIP R-precision, Frechet distance in its CLIP space")
    p.add_argument("--model", default="demo", help="diffusers unCLIP folder with the CLIP image tower (default: demo)")
    helps = {"num_heldin": "one-shape scenes of training (colour, shape) pairs",
             "num_heldout": "scenes of held-out pairs (the heldout split)", "num_two_shape": "two-shape scenes",
             "num_short": "the first held-in scenes captioned without size and position",
             "seed": "seed of the scenes and the sampling",
             "batch_size": "prompts per pipeline call (the last batch is padded)",
             "k": "R-precision: each caption is ranked among k",
             "best_of": "the paper's best-of-N prior: N image embeddings per image, the one closest to the text kept",
             "prior_guidance": "classifier-free guidance scale",
             "decoder_guidance": "classifier-free guidance scale"}
    for name in ("prior_guidance", "decoder_guidance"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help=f"{helps[name]} (default: the model's setting, else diffusers' "
                       f"{KARLO_SETTINGS[name + '_scale']})")
    for name in INT_SETTINGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=type(d[name]), default=d[name],
                       help=f"{helps.get(name, 'sampler steps')} (default {d[name]})")
    p.add_argument("--decoder-only", action="store_true",
                   help="also score images decoded from the real renders' CLIP embeddings (no prior): tells the "
                   "prior's errors from the decoder's")
    p.add_argument("--out", default="unclip_eval", help="folder for report.json and the grids")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache: later runs skip compiling")


def run(args, error) -> int:
    """Runs `unclip-jax evaluate`; bad settings and unreadable models go to `error` (argparse's parser.error)."""
    from unclip_jax.convert.io import CheckpointError
    settings = {name: getattr(args, name) for name in INT_SETTINGS}
    try:
        check_settings(**settings)
    except ValueError as e:
        error(str(e))
    if args.compilation_cache:
        from unclip_jax.pipeline import enable_compilation_cache
        enable_compilation_cache(args.compilation_cache)
    try:
        evaluate(args.model, **settings, prior_guidance=args.prior_guidance, decoder_guidance=args.decoder_guidance,
                 decoder_only=args.decoder_only, out=args.out)
    except CheckpointError as e:
        error(str(e))
    return 0
