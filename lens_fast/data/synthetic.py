"""Synthetic referring segmentation: coloured shapes, one referring expression per image.

Every sample is generated on the fly from ``(seed, split, index)``, so a dataset needs no download and
reads the same on every machine. Splits draw from disjoint random streams (``SeedSequence`` spawn keys),
so train and val never share a scene.

A scene: an image of varied size and aspect ratio, a plain or textured low-saturation background, 2-5
saturated objects (``SHAPES`` x ``COLOURS``), later objects occluding earlier ones (each keeps at least
``min_visible`` of its area). Masks are the exact visible pixels; boxes are xyxy pixel edges.

The expression picks out exactly one object. It is one of four kinds, drawn uniformly among the kinds
that can describe the target (``SyntheticConfig.kinds`` restricts them, e.g. for an easy start):

- attribute: "the red circle", "the star", "the blue object" (the only object with those attributes);
- size: "the biggest square", "the smallest red object" (visible area, at least ``SIZE_RATIO`` apart);
- position: "the leftmost triangle", "the topmost object";
- relation: "the circle left of the blue star" (the anchor is named uniquely by attributes).

Descriptions avoid borderline cases: the referent satisfies a relation clearly (centres at least half
the mean extent apart) and every other candidate fails it outright (on the other side of the anchor's
centre), so a reader never has to guess. The target is drawn uniformly among the describable objects,
so "take the largest object" scores far below 1 (see ``predict_largest_object``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from lens_fast.data.sample import RefSample, mask_to_box

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 127, 14),
    "yellow": (235, 205, 30),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "purple": (148, 60, 189),
}
SPLITS: Dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES: Dict[str, int] = {"train": 20000, "val": 500, "test": 500}
KINDS: Tuple[str, ...] = ("attribute", "size", "position", "relation")

SIZE_RATIO = 1.5  # a superlative's referent differs in visible area from every rival by this factor
CLEAR_SEPARATION = 0.5  # referent's centre offset, in units of the pair's mean extent
DIRECTIONS = ("left", "right", "above", "below")
RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
EXTREME_WORDS = {"left": "leftmost", "right": "rightmost", "above": "topmost", "below": "bottommost"}


@dataclass(frozen=True)
class SyntheticConfig:
    """Scene parameters. Sides are pixels; aspect is width / height, drawn log-uniformly."""

    min_side: int = 96
    max_side: int = 256
    max_aspect: float = 2.0
    min_objects: int = 2
    max_objects: int = 5
    min_radius: float = 0.08  # object radius as a fraction of the image's shorter side
    max_radius: float = 0.22
    min_visible: float = 0.6  # fraction of an object's own area left visible under occluders
    pixel_noise: float = 3.0  # std of the Gaussian brightness noise added to every pixel
    kinds: Tuple[str, ...] = KINDS  # expression kinds to draw from (e.g. ("attribute",) for an easy start)
    # A training aid, off by default: grey levels of a linear ramp added to every pixel, objects included
    # (red from -A at the left edge to +A at the right, blue from -A at the top to +A at the bottom), so
    # that a patch's values say where it is. Qwen2.5-VL's vision tower has no absolute position embedding;
    # a tiny random one cannot localise without it (a linear probe reads the patch position from the
    # tiny policy's vision tokens with R^2 0.75 at A = 80, 0.02 at A = 0: bench/RESULTS.md, issue 17).
    coordinate_ramp: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.coordinate_ramp <= 127.0):
            raise ValueError(f"coordinate_ramp must be in [0, 127] grey levels, got {self.coordinate_ramp!r}")
        if not self.kinds or not set(self.kinds) <= set(KINDS) or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct names from {KINDS}, got {self.kinds!r}")
        if not (16 <= self.min_side <= self.max_side):
            raise ValueError(f"need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if not (2 <= self.min_objects <= self.max_objects <= 8):
            raise ValueError(
                f"need 2 <= min_objects <= max_objects <= 8, got {self.min_objects}, {self.max_objects}"
            )
        if not (0.02 <= self.min_radius <= self.max_radius <= 0.3):
            raise ValueError(
                f"need 0.02 <= min_radius <= max_radius <= 0.3, got {self.min_radius}, {self.max_radius}"
            )
        if not (0.0 < self.min_visible <= 1.0):
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")


@dataclass
class SceneObject:
    """One object: attributes, visible pixels (bool [H, W]), their box (xyxy) and area, and the area
    it had before later objects covered part of it. ``centre`` and ``extent`` (width, height) are the
    visible box's."""

    shape: str
    colour: str
    mask: np.ndarray
    box: np.ndarray
    area: int
    drawn_area: int
    centre: Tuple[float, float] = field(init=False)
    extent: Tuple[float, float] = field(init=False)

    def __post_init__(self) -> None:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        self.centre = ((x1 + x2) / 2, (y1 + y2) / 2)
        self.extent = (x2 - x1, y2 - y1)


@dataclass
class Scene:
    """A generated image, its objects (drawing order), the referent's index, expression and kind, and
    ``candidates``: every expression of the configured kinds that picks out the referent."""

    image: np.ndarray
    objects: List[SceneObject]
    target: int
    expression: str
    kind: str
    candidates: Dict[str, List[str]] = field(default_factory=dict)


def separation(a: SceneObject, b: SceneObject, direction: str) -> float:
    """How far ``a`` lies in ``direction`` of ``b``: centre offset over the pair's mean extent."""
    (ax, ay), (bx, by) = a.centre, b.centre
    (aw, ah), (bw, bh) = a.extent, b.extent
    if direction == "left":
        return (bx - ax) / ((aw + bw) / 2)
    if direction == "right":
        return (ax - bx) / ((aw + bw) / 2)
    if direction == "above":
        return (by - ay) / ((ah + bh) / 2)
    if direction == "below":
        return (ay - by) / ((ah + bh) / 2)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _noun_phrase(colour: Optional[str], shape: Optional[str]) -> str:
    return " ".join(w for w in (colour, shape or "object") if w)


def _descriptors(obj: SceneObject) -> List[Tuple[Optional[str], Optional[str]]]:
    """(colour, shape) descriptions of ``obj``: none, colour only, shape only, both."""
    return [(None, None), (obj.colour, None), (None, obj.shape), (obj.colour, obj.shape)]


def _matches(obj: SceneObject, colour: Optional[str], shape: Optional[str]) -> bool:
    return (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape)


def describe(objects: List[SceneObject], target: int) -> Dict[str, List[str]]:
    """Every expression, by kind, that picks out ``objects[target]`` and no other object."""
    t = objects[target]
    found: Dict[str, List[str]] = {kind: [] for kind in KINDS}

    def unique_names(index: int) -> List[str]:
        obj = objects[index]
        return [
            _noun_phrase(c, s)
            for c, s in _descriptors(obj)[1:]
            if [i for i, o in enumerate(objects) if _matches(o, c, s)] == [index]
        ]

    found["attribute"] = [f"the {name}" for name in unique_names(target)]
    for colour, shape in _descriptors(t):
        group = [i for i, o in enumerate(objects) if _matches(o, colour, shape)]
        if len(group) < 2:
            continue  # already unique: a superlative or relation would only decorate it
        rivals = [objects[i] for i in group if i != target]
        noun = _noun_phrase(colour, shape)
        if all(t.area >= SIZE_RATIO * o.area for o in rivals):
            found["size"] += [f"the biggest {noun}", f"the largest {noun}"]
        if all(t.area * SIZE_RATIO <= o.area for o in rivals):
            found["size"].append(f"the smallest {noun}")
        for direction in DIRECTIONS:
            if all(separation(t, o, direction) >= CLEAR_SEPARATION for o in rivals):
                found["position"].append(f"the {EXTREME_WORDS[direction]} {noun}")
        for anchor_index, anchor in enumerate(objects):
            if anchor_index == target:
                continue
            anchor_names = unique_names(anchor_index)
            if not anchor_names:
                continue
            others = [objects[i] for i in group if i not in (target, anchor_index)]
            for direction in DIRECTIONS:
                if separation(t, anchor, direction) >= CLEAR_SEPARATION and all(
                    separation(o, anchor, direction) <= 0.0 for o in others
                ):
                    found["relation"] += [
                        f"the {noun} {RELATION_WORDS[direction]} the {name}" for name in anchor_names
                    ]
    return found


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with nominal radius r, rotated by ``angle`` radians."""
    if shape == "square":
        points = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "diamond":
        points = [(0.0, -1.05), (0.62, 0.0), (0.0, 1.05), (-0.62, 0.0)]
    elif shape == "triangle":
        points = [(1.1 * math.cos(a), 1.1 * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        points = [
            ((1.1 if k % 2 == 0 else 0.47) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.1 if k % 2 == 0 else 0.47) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    elif shape == "cross":
        a, b = 0.32, 0.95
        points = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _draw_shape(shape: str, height: int, width: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The exact bool [H, W] mask of one shape (PIL rasterisation, no anti-aliasing)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float32 [H, W, 3] low-saturation background: plain, gradient, stripes, checker or noise."""
    kind = rng.integers(5)
    base = rng.uniform(60.0, 200.0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if kind == 0:
        grey = np.full((height, width), base, dtype=np.float32)
    elif kind == 1:
        grey = base + rng.uniform(20, 45) * (along / max(height, width) - 0.5)
    elif kind == 2:
        grey = base + rng.uniform(10, 25) * np.sin(2 * math.pi * along / rng.uniform(6, 20))
    elif kind == 3:
        cell = int(rng.integers(6, 25))
        grey = base + rng.uniform(10, 25) * (((xs // cell + ys // cell) % 2) * 2 - 1)
    else:
        coarse = rng.normal(0.0, 1.0, size=(height // 8 + 2, width // 8 + 2)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))
        grey = base + rng.uniform(12, 25) * smooth
    grey = np.clip(grey, 40.0, 225.0)
    tint = 1.0 + rng.uniform(-0.06, 0.06, size=3).astype(np.float32)
    return grey[..., None] * tint


def _image_size(rng: np.random.Generator, config: SyntheticConfig) -> Tuple[int, int]:
    side = rng.uniform(config.min_side, config.max_side)
    aspect = math.exp(rng.uniform(-math.log(config.max_aspect), math.log(config.max_aspect)))
    width = int(round(np.clip(side * math.sqrt(aspect), config.min_side, config.max_side * config.max_aspect)))
    height = int(round(np.clip(side / math.sqrt(aspect), config.min_side, config.max_side * config.max_aspect)))
    return height, width


def _place_objects(rng: np.random.Generator, config: SyntheticConfig, height: int, width: int):
    """Draw objects one by one; a placement is kept only if every object stays ``min_visible`` visible.

    Returns [(shape, colour, full mask, visible mask)] in drawing order (later ones on top).
    """
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: List[Tuple[str, str, np.ndarray, np.ndarray]] = []
    short = min(height, width)
    for _ in range(count):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        for _attempt in range(40):
            r = short * rng.uniform(config.min_radius, config.max_radius)
            margin = 1.1 * r + 1
            cx = rng.uniform(margin, width - margin)
            cy = rng.uniform(margin, height - margin)
            angle = rng.uniform(-0.25, 0.25)
            full = _draw_shape(shape, height, width, cx, cy, r, angle)
            if np.count_nonzero(full) < 24:
                continue
            still_visible = [vis & ~full for _, _, _, vis in placed]
            if all(
                np.count_nonzero(v) >= config.min_visible * np.count_nonzero(f)
                for v, (_, _, f, _) in zip(still_visible, placed)
            ):
                placed = [(s, c, f, v) for (s, c, f, _), v in zip(placed, still_visible)]
                placed.append((shape, colour, full, full.copy()))
                break
    return placed


def _render(rng: np.random.Generator, config: SyntheticConfig, height: int, width: int, placed) -> np.ndarray:
    image = _background(rng, height, width)
    for _, colour, _, visible in placed:
        rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        image[visible] = rgb
    image += config.pixel_noise * rng.standard_normal(size=(height, width, 1), dtype=np.float32)
    if config.coordinate_ramp:
        image[..., 0] += config.coordinate_ramp * np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
        image[..., 2] += config.coordinate_ramp * np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_scene(rng: np.random.Generator, config: SyntheticConfig = SyntheticConfig()) -> Scene:
    """One scene from ``rng``: image, objects, a describable referent and its expression."""
    while True:
        height, width = _image_size(rng, config)
        placed = _place_objects(rng, config, height, width)
        if len(placed) < config.min_objects:
            continue
        objects = [
            SceneObject(
                shape, colour, visible, mask_to_box(visible), int(np.count_nonzero(visible)), int(np.count_nonzero(full))
            )
            for shape, colour, full, visible in placed
        ]
        descriptions = [
            {kind: options for kind, options in describe(objects, i).items() if kind in config.kinds}
            for i in range(len(objects))
        ]
        describable = [i for i, d in enumerate(descriptions) if any(d.values())]
        if not describable:
            continue
        image = _render(rng, config, height, width, placed)
        target = describable[rng.integers(len(describable))]
        kinds = [kind for kind in config.kinds if descriptions[target][kind]]
        kind = kinds[rng.integers(len(kinds))]
        options = descriptions[target][kind]
        expression = options[rng.integers(len(options))]
        return Scene(image, objects, target, expression, kind, descriptions[target])


class SyntheticRefDataset(torch.utils.data.Dataset):
    """Synthetic referring segmentation, generated on the fly: ``dataset[i]`` is a RefSample.

    split: "train", "val" or "test" (disjoint random streams). size: number of samples (default
    ``DEFAULT_SIZES[split]``). sent_id, ref_id and image_id of sample i are all i.
    """

    def __init__(
        self,
        split: str = "train",
        size: Optional[int] = None,
        seed: int = 0,
        config: SyntheticConfig = SyntheticConfig(),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size is None:
            size = DEFAULT_SIZES[split]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.split = split
        self.size = size
        self.seed = seed
        self.config = config

    def __len__(self) -> int:
        return self.size

    @property
    def sent_ids(self) -> List[int]:
        return list(range(self.size))

    def scene(self, index: int) -> Scene:
        """The full scene behind sample ``index`` (all objects, every valid expression)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__} {index!r}")
        if not (-self.size <= index < self.size):
            raise IndexError(f"index {index!r} out of range for a dataset of {self.size} samples")
        index = int(index) % self.size
        seq = np.random.SeedSequence(entropy=self.seed, spawn_key=(SPLITS[self.split], index))
        return generate_scene(np.random.default_rng(seq), self.config)

    def __getitem__(self, index: int) -> RefSample:
        scene = self.scene(index)
        index = int(index) % self.size
        target = scene.objects[scene.target]
        return RefSample(
            image=scene.image,
            expression=scene.expression,
            mask=target.mask,
            box=target.box,
            sent_id=index,
            ref_id=index,
            image_id=index,
        )

    def target(self, index: int) -> RefSample:
        """Same as ``self[index]`` (generating a scene includes its image)."""
        return self[index]

    def __iter__(self) -> Iterator[RefSample]:
        return (self[i] for i in range(self.size))


def _hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in [0, 360) of float [N, 3] RGB rows with max > min."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    mx, mn = rgb.max(axis=1), rgb.min(axis=1)
    delta = mx - mn
    hue = np.where(mx == r, ((g - b) / delta) % 6, np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return (hue * 60.0) % 360.0


def predict_largest_object(
    image: np.ndarray, min_saturation: float = 0.45, min_pixels: int = 20
) -> np.ndarray:
    """The "largest object" baseline: bool [H, W] mask of the biggest uniformly coloured region.

    Looks only at the image: pixels with HSV saturation above ``min_saturation`` are foreground (the
    synthetic backgrounds are nearly grey); foreground hues are grouped into colours at gaps of at least
    4 degrees in their histogram; each colour is split into 4-connected components, and the largest
    component (at least ``min_pixels``) is returned. Empty when nothing qualifies.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 numpy array [H, W, 3], got {got}")
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    foreground = (mx - mn) > min_saturation * np.maximum(mx, 1).astype(np.float32)
    best = np.zeros(image.shape[:2], dtype=bool)
    if not foreground.any():
        return best
    hue = _hue_degrees(image[foreground].astype(np.float32))
    occupied = np.bincount(hue.astype(np.int64) % 360, minlength=360) > 0
    # Circular runs of occupied 1-degree bins separated by >= 4 empty bins form one colour each.
    colour_of_bin = np.full(360, -1, dtype=np.int64)
    start = int(np.flatnonzero(~occupied)[0]) if (~occupied).any() else 0
    colour, gap = -1, 4
    for step in range(360):
        b = (start + step) % 360
        if occupied[b]:
            if gap >= 4:
                colour += 1
            colour_of_bin[b] = colour
            gap = 0
        else:
            gap += 1
    labels = np.full(image.shape[:2], -1, dtype=np.int64)
    labels[foreground] = colour_of_bin[hue.astype(np.int64) % 360]
    best_area = min_pixels - 1
    for c in range(colour + 1):
        components, count = ndimage.label(labels == c)
        if count == 0:
            continue
        areas = np.bincount(components.ravel())[1:]
        k = int(areas.argmax())
        if areas[k] > best_area:
            best_area = int(areas[k])
            best = components == k + 1
    return best
