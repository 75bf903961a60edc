"""Drawing for bench/compare_data.py: shapes rasterised with exact boxes, blended into a float
canvas (H, W, 3, values 0..1), with the occlusion they cause tracked; and the noise, textures
and shadows that the `textures` dataset is made of. numpy and Pillow only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4  # shapes are drawn this much finer, then averaged: smooth edges, boxes exact to 1/4 pixel

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Polygon = np.ndarray  # (n, 2) points x, y


# --- Shapes: an outline and an optional hole, in units of the shape's radii ---------------------

def regular_polygon(sides: int, radius: float = 1.0) -> Polygon:
    angles = -math.pi / 2 + np.arange(sides) * 2 * math.pi / sides
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def star_polygon(points: int, inner: float) -> Polygon:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]


ARM = 0.34
SHAPES: dict[str, tuple[Polygon, Polygon | None]] = {
    "ellipse": (regular_polygon(64), None),
    "star": (star_polygon(5, 0.45), None),
    "ring": (regular_polygon(64), regular_polygon(64, 0.62)),
    "hexagon-outline": (regular_polygon(6), regular_polygon(6, 0.66)),
    "arrow": (np.array([(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]), None),
    "disc": (regular_polygon(64), None),
    "cross": (np.array([(-ARM, -1), (ARM, -1), (ARM, -ARM), (1, -ARM), (1, ARM), (ARM, ARM), (ARM, 1),
                        (-ARM, 1), (-ARM, ARM), (-1, ARM), (-1, -ARM), (-ARM, -ARM)]), None),
    "triangle": (regular_polygon(3), None),
    "crescent": (regular_polygon(64), regular_polygon(64, 0.8) + np.array((0.45, 0.0))),
}


def posed(shape: Polygon, centre: tuple[float, float], radii: tuple[float, float], angle: float) -> Polygon:
    """Unit-shape points stretched to `radii`, turned by `angle`, moved to `centre` (pixels)."""
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return (shape * radii) @ rotation.T + centre


# --- Rasterising and painting --------------------------------------------------------------------

@dataclass(frozen=True)
class Stamp:
    """A shape rasterised in its own window of the image: coverage per pixel (0..1), where the
    window's top-left pixel is, and the tight box of what was drawn, which may reach past the
    image."""

    alpha: np.ndarray
    left: int
    top: int
    box: Box


def stamp(outer: Polygon, hole: Polygon | None = None) -> Stamp | None:
    """Rasterise a polygon (minus `hole`), both in pixels; None when it covers nothing."""
    left, top = np.floor(outer.min(axis=0)).astype(int)
    right, bottom = np.ceil(outer.max(axis=0)).astype(int) + 1
    fine = Image.new("L", (int(right - left) * SUPERSAMPLE, int(bottom - top) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(fine)
    # Pillow fills from floor(left edge) to floor(right edge), both included: a fine pixel wider
    # and taller than the polygon. Moved half a fine pixel up and left, what it fills is centred
    # on the polygon. The box below is of the pixels drawn, so a label fits what the image shows.
    draw.polygon([tuple(point) for point in (outer - (left, top)) * SUPERSAMPLE - 0.5], fill=255)
    if hole is not None:
        draw.polygon([tuple(point) for point in (hole - (left, top)) * SUPERSAMPLE - 0.5], fill=0)
    covered = np.asarray(fine) > 0
    rows, columns = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
    if rows.size == 0:
        return None
    box = (left + columns[0] / SUPERSAMPLE, top + rows[0] / SUPERSAMPLE,
           left + (columns[-1] + 1) / SUPERSAMPLE, top + (rows[-1] + 1) / SUPERSAMPLE)
    height, width = covered.shape[0] // SUPERSAMPLE, covered.shape[1] // SUPERSAMPLE
    alpha = covered.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)
    return Stamp(alpha, int(left), int(top), box)


def overlap(shape: tuple[int, ...], item: Stamp) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """The slices of an image of `shape` and of the stamp's alpha where the two overlap."""
    height, width = item.alpha.shape
    top, left = max(item.top, 0), max(item.left, 0)
    bottom, right = min(item.top + height, shape[0]), min(item.left + width, shape[1])
    if bottom <= top or right <= left:
        return None
    image = (slice(top, bottom), slice(left, right))
    return image, (slice(top - item.top, bottom - item.top), slice(left - item.left, right - item.left))


def paint(canvas: np.ndarray, item: Stamp, fill: np.ndarray, opacity: float = 1.0) -> None:
    """Blend `fill`, a colour (3,) or an image of the stamp's window (h, w, 3), into the canvas in place."""
    window = overlap(canvas.shape, item)
    if window is None:
        return
    image, own = window
    alpha = item.alpha[own][..., None] * opacity
    fill = fill[own] if fill.ndim == 3 else fill
    canvas[image] = canvas[image] * (1 - alpha) + fill * alpha


def shade(canvas: np.ndarray, item: Stamp, darkness: float) -> None:
    """Darken the canvas in place where the stamp covers it (a shadow)."""
    window = overlap(canvas.shape, item)
    if window is not None:
        canvas[window[0]] *= 1 - darkness * item.alpha[window[1]][..., None]


def local_colour(canvas: np.ndarray, item: Stamp) -> np.ndarray:
    """The canvas's mean colour under the stamp (what the object has to stand out from)."""
    window = overlap(canvas.shape, item)
    weights = item.alpha[window[1]][..., None]
    return (canvas[window[0]] * weights).sum(axis=(0, 1)) / max(float(weights.sum()), 1e-6)


class Occlusion:
    """Which object is on top at each pixel, so that a new object that would hide too much of
    an earlier one is refused."""

    def __init__(self, height: int, width: int, min_visible: float) -> None:
        self.owner = np.full((height, width), -1, dtype=np.int32)
        self.areas: list[int] = []
        self.min_visible = min_visible

    def accepts(self, item: Stamp) -> bool:
        window = overlap(self.owner.shape, item)
        if window is None or not (item.alpha[window[1]] >= 0.5).any():
            return False  # nothing of it would be seen
        hidden = self.owner[window[0]][item.alpha[window[1]] >= 0.5]
        lost = np.bincount(hidden[hidden >= 0], minlength=len(self.areas))
        visible = np.bincount(self.owner[self.owner >= 0], minlength=len(self.areas))
        return bool((visible - lost >= self.min_visible * np.array(self.areas)).all())

    def add(self, item: Stamp) -> None:
        image, own = overlap(self.owner.shape, item)
        solid = item.alpha[own] >= 0.5
        self.owner[image][solid] = len(self.areas)
        self.areas.append(int(solid.sum()))


# --- Backgrounds and fills -----------------------------------------------------------------------

def value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in about 0..1: random values on a grid of `cells` across the long side, interpolated."""
    scale = cells / max(height, width)
    grid = rng.random((math.ceil(height * scale) + 2, math.ceil(width * scale) + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))


def fractal(rng: np.random.Generator, height: int, width: int, cells: int = 3, octaves: int = 5) -> np.ndarray:
    """Cloud-like noise, 0..1: octaves of value noise, each twice as fine and half as strong."""
    total = sum(0.5**octave * value_noise(rng, height, width, cells * 2**octave) for octave in range(octaves))
    return (total - total.min()) / max(float(total.max() - total.min()), 1e-6)


def ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear ramp from -1 to 1 across the image in a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    return 2 * (along - along.min()) / max(float(along.max() - along.min()), 1e-6) - 1


def pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A surface texture, about -1..1: a gradient, stripes, a checkerboard or noise."""
    kind = rng.integers(4)
    if kind == 0:
        return ramp(rng, height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(3, 10)
        return np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period)
    if kind == 2:
        cell = rng.uniform(2, 8)
        return np.where((np.floor(xs / cell) + np.floor(ys / cell)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    return 2 * fractal(rng, height, width, cells=2, octaves=3) - 1


def textured_fill(rng: np.random.Generator, canvas: np.ndarray, item: Stamp) -> np.ndarray:
    """A fill for the stamp's window: a colour at a random contrast (faint to strong) from what
    lies beneath, with a texture on it."""
    beneath = local_colour(canvas, item)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    contrast = rng.uniform(0.06, 0.5)
    colour = beneath + contrast * direction
    if np.abs(np.clip(colour, 0, 1) - beneath).sum() < 0.5 * np.abs(colour - beneath).sum():
        colour = beneath - contrast * direction  # clipping ate the contrast: go the other way
    texture = pattern(rng, *item.alpha.shape) * rng.uniform(0.03, 0.2)
    return np.clip(colour, 0, 1).astype(np.float32) + texture[..., None]


def shadow(rng: np.random.Generator, item: Stamp, light: np.ndarray) -> Stamp:
    """The stamp blurred and moved away from the light: a soft shadow."""
    size = max(item.alpha.shape)
    blur = max(1.0, size * rng.uniform(0.03, 0.08))
    pad = math.ceil(3 * blur)
    coverage = Image.fromarray((np.pad(item.alpha, pad) * 255).round().astype(np.uint8))
    soft = np.asarray(coverage.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32) / 255
    offset = np.round(-light * size * rng.uniform(0.04, 0.12)).astype(int)
    return Stamp(soft, item.left - pad + int(offset[0]), item.top - pad + int(offset[1]), item.box)


def random_pose(rng: np.random.Generator, shape: str, side: float) -> tuple[Polygon, Polygon | None]:
    """The shape around (0, 0): `side` pixels long at most, a random aspect (0.5..1) and angle."""
    outer, hole = SHAPES[shape]
    radii = (side / 2, side / 2 * rng.uniform(0.5, 1.0))
    angle = rng.uniform(0, 2 * math.pi)
    return posed(outer, (0, 0), radii, angle), None if hole is None else posed(hole, (0, 0), radii, angle)


def moved(shape: tuple[Polygon, Polygon | None], offset: np.ndarray) -> Stamp | None:
    outer, hole = shape
    return stamp(outer + offset, None if hole is None else hole + offset)


def finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Sensor noise, then 8 bits."""
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(0.005, 0.03)
    return (np.clip(canvas + noise, 0, 1) * 255).round().astype(np.uint8)
