"""Detection datasets nobody tuned for, to compare our trainer with YOLOv5 at convergence.

    python bench/compare_data.py --name mixed [--out datasets/mixed] [--seed 0] [--train 256] [--val 64]
        [--size 320 | --size 320x256] [--stats]

The trainer was developed on its built-in synthetic set (trainer/data/synthetic.py), so a
comparison on that set alone favours whatever was tuned against it. These sets have other
statistics and share no code with it:

- `mixed`: five shape classes at frequencies 16:8:4:2:1 (the shape is the class, the colour is
  random), most objects small and some large (long sides from 1/30 to 1/2 of the short image
  side), drawn over each other in order, so a later object may hide up to 70% of an earlier
  one; 0 to 12 objects on a plain gradient.
- `textures`: four shape classes on fractal-cloud backgrounds with line clutter and textured
  patches that are not objects. Objects are textured, cast soft shadows, range from faint to
  strong contrast, and may be cut by the image border: a cut box is clipped to the image and
  dropped when it keeps less than 40% of its area. Every image gets its own brightness and
  colour cast.
- `shapes`: the set a gap between the trainers was first reported on, rebuilt from its
  description: four solid shape classes, long sides from 1/12 to 1/3 of the short image side,
  wholly inside the image and mostly apart, on blurred colour noise; 1 to 8 objects.

The layout is YOLO's (images/<split>/*.jpg, labels/<split>/*.txt with `class cx cy w h`
normalised, in drawing order) with a data.yaml that both trainers read. The same arguments
give the same bytes. A finished dataset carries a marker file; running again with the same
arguments leaves it as it is. A dataset is written beside its folder and renamed into place,
so a half-written one never appears under its name. Prints the data.yaml's path, or with
`--stats` one JSON line with the path and the statistics measured from the label files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare_drawing import (
    Box,
    Occlusion,
    Polygon,
    Stamp,
    finish,
    fractal,
    local_colour,
    moved,
    paint,
    posed,
    ramp,
    random_pose,
    regular_polygon,
    shade,
    shadow,
    stamp,
    textured_fill,
    value_noise,
)

VERSION = 1  # bump when the drawing changes: datasets of an older version are generated again
MARKER = "compare_data.json"
SPLITS = ("train", "val")
JPEG_QUALITY = 92
EMPTY_SHARE = 0.05
MIN_KEPT_AREA = 0.4  # a box cut by the border is kept when at least this share of its area is inside
ATTEMPTS = 30  # placements tried per object before it is left out
DEFAULT_SIZES = {"train": 256, "val": 64, "size": 320}  # images per split, and the image side in pixels

Label = tuple[int, float, float, float, float]  # class, cx, cy, w, h normalised


# --- Labels ----------------------------------------------------------------------------------------

def label(class_index: int, box: Box, width: int, height: int) -> Label | None:
    """The box clipped to the image, normalised; None when less than MIN_KEPT_AREA of it is inside."""
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    full = (box[2] - box[0]) * (box[3] - box[1])
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) < MIN_KEPT_AREA * full:
        return None
    return class_index, (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height


def object_count(rng: np.random.Generator, most: int) -> int:
    return 0 if rng.random() < EMPTY_SHARE else int(rng.integers(1, most + 1))


def place(occlusion: Occlusion, pose: Callable[[], tuple[Polygon, Polygon | None]],
          centre: Callable[[Polygon], np.ndarray]) -> Stamp | None:
    """Up to ATTEMPTS shapes (`pose`), each moved to `centre(outline)`, until one leaves every
    earlier object visible enough; None when none does."""
    for _attempt in range(ATTEMPTS):
        shape = pose()
        item = moved(shape, centre(shape[0]))
        if item is not None and occlusion.accepts(item):
            return item
    return None


def visible_colour(rng: np.random.Generator, canvas: np.ndarray, item: Stamp, contrast: float) -> np.ndarray:
    """A random colour, drawn again (up to 20 times) until it differs from what lies beneath by
    more than `contrast` (summed over the channels)."""
    colour = rng.uniform(0, 1, 3)
    for _retry in range(20):
        if np.abs(colour - local_colour(canvas, item)).sum() > contrast:
            break
        colour = rng.uniform(0, 1, 3)
    return colour


# --- The datasets --------------------------------------------------------------------------------

MIXED_CLASSES = ("ellipse", "star", "ring", "hexagon-outline", "arrow")
MIXED_WEIGHTS = np.array([16, 8, 4, 2, 1]) / 31
TEXTURE_CLASSES = ("disc", "cross", "triangle", "crescent")


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def inside(rng: np.random.Generator, outline: Polygon, width: int, height: int) -> np.ndarray:
    """A centre that keeps the whole outline inside the image (where it fits)."""
    low, high = -outline.min(axis=0), np.array([width, height]) - outline.max(axis=0)
    return rng.uniform(low, np.maximum(low, high))


def mixed_side(rng: np.random.Generator, short_side: int) -> float:
    """Small and large objects mixed: 55% of 1/30..1/12 of the short side, 15% up to 1/5, 30% up to 1/2."""
    low, high = [(1 / 30, 1 / 12), (1 / 12, 1 / 5), (1 / 5, 1 / 2)][rng.choice(3, p=[0.55, 0.15, 0.3])]
    return log_uniform(rng, low, high) * short_side


def mixed_centre(rng: np.random.Generator, outer: Polygon, boxes: list[Box], width: int, height: int) -> np.ndarray:
    """Where a shape goes, wholly inside the image; often onto an earlier object, for heavy overlaps."""
    low, high = -outer.min(axis=0), np.array([width, height]) - outer.max(axis=0)
    if boxes and rng.random() < 0.4:
        x0, y0, x1, y1 = boxes[rng.integers(len(boxes))]
        return np.clip([rng.uniform(x0, x1), rng.uniform(y0, y1)], low, np.maximum(low, high))
    return rng.uniform(low, np.maximum(low, high))


def render_mixed(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[Label]]:
    """Imbalanced classes, sizes from tiny to half the image, heavy occlusion, on a plain gradient."""
    start, end = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    mix = (ramp(rng, height, width)[..., None] + 1) / 2
    canvas = (start * (1 - mix) + end * mix).astype(np.float32)
    occlusion = Occlusion(height, width, min_visible=0.3)
    boxes: list[Box] = []
    labels: list[Label | None] = []
    for _ in range(object_count(rng, 12)):
        name = MIXED_CLASSES[class_index := int(rng.choice(len(MIXED_CLASSES), p=MIXED_WEIGHTS))]
        item = place(occlusion, lambda name=name: random_pose(rng, name, mixed_side(rng, min(width, height))),
                     lambda outline: mixed_centre(rng, outline, boxes, width, height))
        if item is None:
            continue
        paint(canvas, item, visible_colour(rng, canvas, item, 0.45).astype(np.float32))
        occlusion.add(item)
        boxes.append(item.box)
        labels.append(label(class_index, item.box, width, height))
    return finish(rng, canvas), [entry for entry in labels if entry is not None]


def clutter(rng: np.random.Generator, canvas: np.ndarray, lines: int, patches: int) -> None:
    """Things that are not objects: thin lines, and textured blobs and bars, some with shadows."""
    height, width = canvas.shape[:2]
    for _ in range(lines):
        length = rng.uniform(0.2, 1.0) * math.hypot(width, height)
        bar = posed(regular_polygon(4), (rng.uniform(0, width), rng.uniform(0, height)),
                    (length / 2, rng.uniform(0.4, 1.6)), rng.uniform(0, math.pi))
        item = stamp(bar)
        if item is not None:
            paint(canvas, item, rng.uniform(0, 1, 3).astype(np.float32), opacity=rng.uniform(0.4, 1.0))
    for _ in range(patches):
        side = math.exp(rng.uniform(math.log(0.05), math.log(0.4))) * min(width, height)
        if rng.random() < 0.5:  # an irregular blob
            corners = int(rng.integers(9, 17))
            outline = regular_polygon(corners) * rng.uniform(0.45, 1.0, (corners, 1))
        else:  # a bar
            outline = regular_polygon(4) * (1, rng.uniform(0.15, 0.5))
        item = stamp(posed(outline, (rng.uniform(0, width), rng.uniform(0, height)),
                           (side / 2, side / 2), rng.uniform(0, 2 * math.pi)))
        if item is None:
            continue
        if rng.random() < 0.5:
            shade(canvas, shadow(rng, item, rng.normal(size=2)), rng.uniform(0.2, 0.5))
        paint(canvas, item, textured_fill(rng, canvas, item))


def textures_centre(rng: np.random.Generator, outer: Polygon, width: int, height: int) -> np.ndarray:
    """Where a shape goes: inside the image, or for a quarter of them across one of its borders,
    10% to 80% of the way out."""
    low, high = -outer.min(axis=0), np.array([width, height]) - outer.max(axis=0)
    centre = rng.uniform(low, np.maximum(low, high))
    if rng.random() < 0.25:
        axis = int(rng.integers(2))
        out = rng.uniform(0.1, 0.8) * np.ptp(outer[:, axis])
        centre[axis] = low[axis] - out if rng.random() < 0.5 else high[axis] + out
    return centre


def render_textures(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[Label]]:
    """Textured, shadowed objects of varying contrast on photo-like clutter; some cut by the border."""
    clouds = fractal(rng, height, width)[..., None]
    canvas = rng.uniform(0, 1, 3) * (1 - clouds) + rng.uniform(0, 1, 3) * clouds
    canvas += ramp(rng, height, width)[..., None] * rng.uniform(0, 0.2)
    canvas += (fractal(rng, height, width, cells=24, octaves=2)[..., None] - 0.5) * rng.uniform(0, 0.2)
    canvas = np.clip(canvas, 0, 1).astype(np.float32)
    clutter(rng, canvas, lines=int(rng.integers(3, 16)), patches=int(rng.integers(1, 6)))
    light = rng.normal(size=2)
    light /= np.linalg.norm(light) + 1e-9
    occlusion = Occlusion(height, width, min_visible=0.5)
    labels: list[Label | None] = []
    for _ in range(object_count(rng, 10)):
        name = TEXTURE_CLASSES[class_index := int(rng.integers(len(TEXTURE_CLASSES)))]
        item = place(occlusion,
                     lambda name=name: random_pose(rng, name, log_uniform(rng, 0.08, 0.45) * min(width, height)),
                     lambda outline: textures_centre(rng, outline, width, height))
        if item is None:
            continue
        shade(canvas, shadow(rng, item, light), rng.uniform(0.2, 0.6))
        paint(canvas, item, textured_fill(rng, canvas, item))
        occlusion.add(item)
        labels.append(label(class_index, item.box, width, height))
    clutter(rng, canvas, lines=int(rng.integers(0, 4)), patches=0)  # lines across the objects too
    gamma, gains, offset = rng.uniform(0.75, 1.35), rng.uniform(0.75, 1.25, 3), rng.uniform(-0.12, 0.12)
    canvas = np.clip(canvas, 0, 1) ** gamma * gains + offset  # the image's own exposure and colour cast
    return finish(rng, canvas.astype(np.float32)), [entry for entry in labels if entry is not None]


SHAPES_CLASSES = ("disc", "triangle", "cross", "star")


def render_shapes(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[Label]]:
    """The set the trainer gap was first reported on, as described there: four solid shape classes,
    long sides 1/12 to 1/3 of the short image side, wholly inside and apart (at most 20% of one
    hidden), in a flat colour on blurred colour noise; 1 to 8 objects."""
    blur = value_noise(rng, height, width, cells=int(rng.integers(6, 24)))[..., None]
    grain = np.stack([value_noise(rng, height, width, cells=48) for _ in range(3)], axis=-1)
    canvas = (rng.uniform(0, 1, 3) * (1 - blur) + rng.uniform(0, 1, 3) * blur + (grain - 0.5) * 0.25)
    canvas = np.clip(canvas, 0, 1).astype(np.float32)
    occlusion = Occlusion(height, width, min_visible=0.8)
    labels: list[Label | None] = []
    for _ in range(object_count(rng, 8)):
        name = SHAPES_CLASSES[class_index := int(rng.integers(len(SHAPES_CLASSES)))]
        item = place(occlusion,
                     lambda name=name: random_pose(rng, name, log_uniform(rng, 1 / 12, 1 / 3) * min(width, height)),
                     lambda outline: inside(rng, outline, width, height))
        if item is None:
            continue
        paint(canvas, item, visible_colour(rng, canvas, item, 0.6).astype(np.float32))
        occlusion.add(item)
        labels.append(label(class_index, item.box, width, height))
    return finish(rng, canvas), [entry for entry in labels if entry is not None]


@dataclass(frozen=True)
class Recipe:
    names: tuple[str, ...]
    render: Callable[[np.random.Generator, int, int], tuple[np.ndarray, list[Label]]]


RECIPES = {"mixed": Recipe(MIXED_CLASSES, render_mixed), "textures": Recipe(TEXTURE_CLASSES, render_textures),
           "shapes": Recipe(SHAPES_CLASSES, render_shapes)}


# --- Writing, and reading back -------------------------------------------------------------------

def write_split(root: Path, recipe: Recipe, split: str, count: int, seed: int, width: int, height: int) -> None:
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for index in range(count):
        # One stream per image: an image does not change when the counts do.
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        pixels, labels = recipe.render(rng, width, height)
        Image.fromarray(pixels).save(root / "images" / split / f"{index:06d}.jpg", quality=JPEG_QUALITY)
        lines = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels if w > 0 and h > 0)
        (root / "labels" / split / f"{index:06d}.txt").write_text(lines)


def parse_size(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """`320` or `320x256` (width x height) as (width, height)."""
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, tuple):
        width, height = text
    else:
        parts = str(text).lower().split("x")
        if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
            raise click.BadParameter(f"size {text!r}: give pixels, e.g. 320, or width x height, e.g. 320x256")
        width, height = int(parts[0]), int(parts[-1])
    if min(width, height) < 32:
        raise click.BadParameter(f"size {width}x{height}: both sides must be at least 32 pixels")
    return width, height


def make_dataset(name: str, out: str | Path, seed: int = 0, train: int = DEFAULT_SIZES["train"],
                 val: int = DEFAULT_SIZES["val"], size: int | str | tuple[int, int] = DEFAULT_SIZES["size"]) -> Path:
    """Write dataset `name` into `out` unless it is there already with these settings; the path
    of its data.yaml."""
    if name not in RECIPES:
        raise click.BadParameter(f"dataset {name!r}: choose one of {', '.join(RECIPES)}")
    if train < 1 or val < 1 or seed < 0:
        raise click.BadParameter(f"train={train}, val={val}, seed={seed}: "
                                 "counts must be at least 1, the seed 0 or more")
    width, height = parse_size(size)
    out = Path(out).absolute()
    fingerprint = {"generator": "bench/compare_data.py", "version": VERSION, "name": name, "seed": seed,
                   "train": train, "val": val, "width": width, "height": height}
    if read_marker(out) != fingerprint:
        generate(RECIPES[name], out, fingerprint)
    data_yaml = out / "data.yaml"
    config = yaml.safe_dump({"path": str(out), "train": "images/train", "val": "images/val",
                             "nc": len(RECIPES[name].names), "names": list(RECIPES[name].names)}, sort_keys=False)
    if not data_yaml.is_file() or data_yaml.read_text() != config:  # also when the folder has moved
        data_yaml.write_text(config)
    return data_yaml


def generate(recipe: Recipe, out: Path, fingerprint: dict[str, Any]) -> None:
    """Write into a folder beside `out`, then rename it into place (replacing an older dataset of ours)."""
    if out.exists() and not (out / MARKER).is_file():
        raise click.ClickException(f"{out} exists and was not written by compare_data.py; "
                                   "move it or choose another --out")
    print(f"generating {fingerprint['name']} in {out}", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-", dir=out.parent))
    retired = out.parent / f".{out.name}-old-{os.getpid()}"
    try:
        for split in SPLITS:
            write_split(staging, recipe, split, fingerprint[split], fingerprint["seed"],
                        fingerprint["width"], fingerprint["height"])
        (staging / MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if out.exists():
            os.replace(out, retired)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def dataset_statistics(root: Path) -> dict[str, Any]:
    """Measured from the label files of any YOLO-layout dataset (the built-in one too): objects per
    image, box sizes (sqrt(w·h), a share of the image side), class shares, overlaps, border boxes."""
    per_image = [read_labels(path) for path in sorted((root / "labels").glob("*/*.txt"))]
    counts = np.array([len(labels) for labels in per_image])
    boxes = np.concatenate(per_image)
    classes = np.bincount(boxes[:, 0].astype(int))
    corners = np.concatenate([boxes[:, 1:3] - boxes[:, 3:5] / 2, boxes[:, 1:3] + boxes[:, 3:5] / 2], axis=1)
    sizes = np.sqrt(boxes[:, 3] * boxes[:, 4])
    return {
        "images": len(per_image), "objects": len(boxes),
        "objects_per_image": {"mean": round(float(counts.mean()), 2), **quantile(counts, (0, 50, 90, 100)),
                              "empty_share": round(float((counts == 0).mean()), 3)},
        "size": {**quantile(sizes, (5, 25, 50, 75, 95)), "below_0.1": round(float((sizes < 0.1).mean()), 3),
                 "above_0.3": round(float((sizes > 0.3).mean()), 3)},
        "class_share": [round(float(count / classes.sum()), 3) for count in classes],
        "covered_half_share": round(covered_share(per_image), 3),
        "touching_border_share": round(float(((corners <= 1e-3) | (corners >= 1 - 1e-3)).any(axis=1).mean()), 3),
    }


def read_labels(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def quantile(values: np.ndarray, percents: tuple[int, ...]) -> dict[str, float]:
    return {f"p{percent}": round(float(np.percentile(values, percent)), 4) for percent in percents}


def covered_share(per_image: list[np.ndarray]) -> float:
    """The share of boxes of which another box in the same image covers at least half."""
    covered = total = 0
    for labels in per_image:
        x0, y0 = labels[:, 1] - labels[:, 3] / 2, labels[:, 2] - labels[:, 4] / 2
        x1, y1 = labels[:, 1] + labels[:, 3] / 2, labels[:, 2] + labels[:, 4] / 2
        width = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
        height = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
        shared = width * height / (labels[:, 3] * labels[:, 4])[:, None]
        np.fill_diagonal(shared, 0)
        covered += int((shared >= 0.5).any(axis=1).sum())
        total += len(labels)
    return covered / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, help="the dataset folder (default: datasets/<name>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=DEFAULT_SIZES["train"], help="training images")
    parser.add_argument("--val", type=int, default=DEFAULT_SIZES["val"], help="validation images")
    parser.add_argument("--size", default=str(DEFAULT_SIZES["size"]),
                        help="image size in pixels: 320, or width x height, e.g. 320x256")
    parser.add_argument("--stats", action="store_true", help="print one JSON line with the measured statistics")
    args = parser.parse_args(argv)
    data_yaml = make_dataset(args.name, args.out or Path("datasets") / args.name, args.seed, args.train, args.val,
                             args.size)
    if args.stats:
        print(json.dumps({"data": str(data_yaml), **dataset_statistics(data_yaml.parent)}), flush=True)
    else:
        print(data_yaml, flush=True)


if __name__ == "__main__":
    try:
        main()
    except click.ClickException as error:  # a user mistake: a message, not a traceback
        error.show()
        sys.exit(error.exit_code)
