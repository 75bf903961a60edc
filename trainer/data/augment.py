"""Image and box transforms: letterbox for validation; mosaic, random perspective, mixup,
copy-paste, colour and flips for training.

Images are uint8 tensors (3, H, W). Boxes are float tensors (n, 5) holding class, x0, y0,
x1, y1 in pixels of the image they travel with; every transform moves both together. Random
choices come from the numpy Generator passed in, never from global state.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from trainer.config import Hyp

FILL = 114  # grey of letterbox and warp borders
MIN_SIDE = 2.0  # pixels: thinner boxes after a transform are dropped
MIN_AREA_RATIO = 0.1  # of the box's area before the transform (scaled), else mostly cut off
MAX_ASPECT = 100.0  # YOLOv5's limit: a box cut to a thin strip at the border still counts
PASTE_MAX_COVER = 0.3  # a pasted box may cover at most this share of an existing box
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class Augmentation:
    """The hyperparameters that drive augmentation, in the order they are shared with workers."""

    hsv_h: float
    hsv_s: float
    hsv_v: float
    degrees: float
    translate: float
    scale: float
    shear: float
    perspective: float
    flipud: float
    fliplr: float
    mosaic: float
    mixup: float
    copy_paste: float

    @classmethod
    def from_hyp(cls, hyp: Hyp) -> Augmentation:
        return cls(**{field.name: float(getattr(hyp, field.name)) for field in fields(cls)})

    def as_tuple(self) -> tuple[float, ...]:
        return astuple(self)


def resize_to_fit(image: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Resize so the long side is `size`, keeping the aspect ratio: bilinear, and antialiased
    (area-weighted when shrinking) unless `antialias` is False.

    Training images are shrunk without antialiasing, as YOLOv5's training loader shrinks them
    (OpenCV's INTER_LINEAR), and validation images with it (YOLOv5's INTER_AREA). Antialiased
    training images trained worse: on bench/README.md's `textures` set, shrinking them without
    antialiasing raised mAP@0.5:0.95 from 0.042 to 0.058 over four seeds (three up, one level).
    """
    height, width = image.shape[1:]
    ratio = size / max(height, width)
    if ratio == 1:
        return image
    new_size = [max(1, round(height * ratio)), max(1, round(width * ratio))]
    return F.resize(image, new_size, interpolation=F.InterpolationMode.BILINEAR, antialias=antialias)


def letterbox(image: torch.Tensor, canvas: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad an image that fits in the (height, width) canvas to exactly that, centred; returns
    the (left, top) padding."""
    height, width = image.shape[1:]
    canvas_height, canvas_width = canvas
    left, top = (canvas_width - width) // 2, (canvas_height - height) // 2
    padded = F.pad(image, [left, top, canvas_width - width - left, canvas_height - height - top], fill=FILL)
    return padded, (left, top)


def shift_boxes(boxes: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    shifted = boxes.clone()
    shifted[:, [1, 3]] += dx
    shifted[:, [2, 4]] += dy
    return shifted


def mosaic(
    images: list[torch.Tensor], boxes: list[torch.Tensor], size: int, centre: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Four images around `centre` on a 2·size canvas: they meet it with their bottom-right,
    bottom-left, top-right and top-left corners. Boxes are clipped to the canvas."""
    canvas_size = 2 * size
    canvas = torch.full((3, canvas_size, canvas_size), FILL, dtype=torch.uint8)
    centre_x, centre_y = centre
    placed = []
    for position, (image, image_boxes) in enumerate(zip(images, boxes)):
        height, width = image.shape[1:]
        x = centre_x - width if position in (0, 2) else centre_x
        y = centre_y - height if position in (0, 1) else centre_y
        left, top = max(x, 0), max(y, 0)
        right, bottom = min(x + width, canvas_size), min(y + height, canvas_size)
        canvas[:, top:bottom, left:right] = image[:, top - y : bottom - y, left - x : right - x]
        placed.append(shift_boxes(image_boxes, x, y))
    merged = torch.cat(placed)
    merged[:, 1:].clamp_(0, canvas_size)
    return canvas, merged


def covered_share(boxes: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """For each xyxy box, the share of its area that the xyxy box `cover` overlaps."""
    overlap_width = (torch.minimum(boxes[:, 2], cover[2]) - torch.maximum(boxes[:, 0], cover[0])).clamp(min=0)
    overlap_height = (torch.minimum(boxes[:, 3], cover[3]) - torch.maximum(boxes[:, 1], cover[1])).clamp(
        min=0
    )
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-9)
    return overlap_width * overlap_height / areas


def copy_paste(
    image: torch.Tensor, boxes: torch.Tensor, probability: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy each box's pixels, with `probability`, to its mirror position across the vertical
    centre line (mirrored), unless that would hide much of a box already there.

    YOLOv5 pastes segmentation masks; with box labels only, the whole box is the patch.
    """
    if probability <= 0 or not len(boxes):
        return image, boxes
    image, width = image.clone(), image.shape[2]
    all_boxes = boxes
    for row in boxes[torch.from_numpy(rng.random(len(boxes)) < probability)]:
        left, top, right, bottom = (round(value) for value in row[1:].tolist())
        if right - left < 1 or bottom - top < 1:
            continue
        pasted = torch.tensor([row[0], width - right, top, width - left, bottom], dtype=boxes.dtype)
        if covered_share(all_boxes[:, 1:], pasted[1:]).max() >= PASTE_MAX_COVER:
            continue
        image[:, top:bottom, width - right : width - left] = image[:, top:bottom, left:right].flip(-1)
        all_boxes = torch.cat([all_boxes, pasted[None]])
    return image, all_boxes


Size = int | tuple[int, int]  # an output's side (a square), or its (height, width)


def height_width(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def perspective_matrix(
    in_size: tuple[int, int], out_size: Size, augmentation: Augmentation, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """A random 3×3 map from input to output pixels, and its scale factor.

    The input's centre goes to the origin, then perspective, rotation with scale, shear, and
    a translation that puts it near the output's centre (YOLOv5's order of composition).
    """
    in_height, in_width = in_size
    centre = np.array([[1.0, 0.0, -in_width / 2], [0.0, 1.0, -in_height / 2], [0.0, 0.0, 1.0]])
    perspective = np.eye(3)
    perspective[2, :2] = rng.uniform(-augmentation.perspective, augmentation.perspective, 2)
    angle = math.radians(rng.uniform(-augmentation.degrees, augmentation.degrees))
    # Kept positive: a scale gain of 1 or more would otherwise allow a singular or mirrored map.
    scale = max(rng.uniform(1 - augmentation.scale, 1 + augmentation.scale), 0.05)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    shear = np.eye(3)
    shear[0, 1], shear[1, 0] = np.tan(np.radians(rng.uniform(-augmentation.shear, augmentation.shear, 2)))
    translation = np.eye(3)
    out_height, out_width = height_width(out_size)
    shift = 0.5 + rng.uniform(-augmentation.translate, augmentation.translate, 2)
    translation[:2, 2] = shift * (out_width, out_height)
    return translation @ shear @ rotation @ perspective @ centre, scale


def apply_homography(
    matrix: np.ndarray, xs: torch.Tensor, ys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map points through a 3×3 matrix; xs and ys broadcast against each other (a row of x and a
    column of y give a whole grid). Written out per element rather than as a matmul so the
    result does not depend on the BLAS kernel, which can vary with the thread count."""
    (a, b, c), (d, e, f), (g, h, i) = matrix.tolist()
    mapped_x, mapped_y = xs * a + (ys * b + c), xs * d + (ys * e + f)
    if g == 0 and h == 0 and i == 1:  # affine: no division needed
        return mapped_x, mapped_y
    denominator = xs * g + (ys * h + i)
    return mapped_x / denominator, mapped_y / denominator


def source_window(inverse: np.ndarray, out_size: Size, in_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The input pixels (x0, y0, x1, y1) that bilinear sampling of the output can touch: the
    box around the output's corners mapped back, one pixel wider each side, within the input.
    The whole input for a map that sends a corner through infinity."""
    in_height, in_width = in_size
    out_height, out_width = height_width(out_size)
    corners = np.array([[0, 0, out_width, out_width], [0, out_height, 0, out_height], [1, 1, 1, 1]], dtype=np.float64)
    mapped = inverse @ corners
    if (mapped[2] <= 0).any():
        return 0, 0, in_width, in_height
    xs, ys = mapped[0] / mapped[2], mapped[1] / mapped[2]
    x0, x1 = (int(np.clip(value, 0, in_width)) for value in (math.floor(xs.min()) - 1, math.ceil(xs.max()) + 1))
    y0, y1 = (int(np.clip(value, 0, in_height)) for value in (math.floor(ys.min()) - 1, math.ceil(ys.max()) + 1))
    return x0, y0, x1, y1


def warp(image: torch.Tensor, matrix: np.ndarray, out_size: Size) -> torch.Tensor:
    """Warp an image by `matrix` into an image of `out_size` with grey borders.

    torchvision's affine and perspective keep the input's canvas size; a mosaic is twice the
    output's side, so they would warp four times the pixels and crop. Sampling the output
    grid directly does a quarter of the work, and only the window of the input that the output
    samples from is converted to float.
    """
    inverse = np.linalg.inv(matrix)
    out_height, out_width = height_width(out_size)
    x0, y0, x1, y1 = source_window(inverse, out_size, tuple(image.shape[1:]))
    if x1 <= x0 or y1 <= y0:  # the output sees none of the input
        return torch.full((3, out_height, out_width), FILL, dtype=torch.uint8)
    # For each output pixel centre: where it comes from, in grid_sample's -1..1 coordinates of the window.
    to_grid = np.array([[2 / (x1 - x0), 0, -1], [0, 2 / (y1 - y0), -1], [0, 0, 1]])
    to_grid = to_grid @ np.array([[1.0, 0, -x0], [0, 1.0, -y0], [0, 0, 1]]) @ inverse
    column_centres = torch.arange(out_width, dtype=torch.float32) + 0.5
    row_centres = torch.arange(out_height, dtype=torch.float32) + 0.5
    grid_x, grid_y = apply_homography(to_grid, column_centres[None, :], row_centres[:, None])
    grid = torch.stack((grid_x, grid_y), dim=-1)[None]
    # Shift by the fill value so that zero padding outside the input becomes the grey border.
    shifted = image[None, :, y0:y1, x0:x1].to(torch.float32).sub_(FILL)
    warped = torch.nn.functional.grid_sample(
        shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped[0].add_(FILL).round_().clamp_(0, 255).to(torch.uint8)


def transform_boxes(boxes: torch.Tensor, matrix: np.ndarray, out_size: Size) -> torch.Tensor:
    """The xyxy boxes enclosing each box's four mapped corners, clipped to the output."""
    xs = boxes[:, [0, 2, 2, 0]]
    ys = boxes[:, [1, 1, 3, 3]]
    mapped_x, mapped_y = apply_homography(matrix, xs, ys)
    out_height, out_width = height_width(out_size)
    return torch.stack([mapped_x.amin(1).clamp(0, out_width), mapped_y.amin(1).clamp(0, out_height),
                        mapped_x.amax(1).clamp(0, out_width), mapped_y.amax(1).clamp(0, out_height)], dim=1)


def keep_boxes(before: torch.Tensor, after: torch.Tensor, scale: float) -> torch.Tensor:
    """Which transformed boxes are still worth learning from: not a sliver, not mostly cut
    off (area vs the scaled original), not absurdly elongated."""
    width, height = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    area_before = (before[:, 2] - before[:, 0]) * (before[:, 3] - before[:, 1]) * scale**2
    aspect = torch.maximum(width / (height + 1e-9), height / (width + 1e-9))
    return (
        (width > MIN_SIDE)
        & (height > MIN_SIDE)
        & (width * height / (area_before + 1e-9) > MIN_AREA_RATIO)
        & (aspect < MAX_ASPECT)
    )


def random_perspective(
    image: torch.Tensor,
    boxes: torch.Tensor,
    out_size: Size,
    augmentation: Augmentation,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly rotate, scale, shear, translate and tilt into an image of `out_size`, dropping
    boxes that end up too small or mostly outside."""
    matrix, scale = perspective_matrix(tuple(image.shape[1:]), out_size, augmentation, rng)
    warped = warp(image, matrix, out_size)
    moved = transform_boxes(boxes[:, 1:], matrix, out_size)
    keep = keep_boxes(boxes[:, 1:], moved, scale)
    return warped, torch.cat([boxes[keep, :1], moved[keep]], dim=1)


def mixup(
    image: torch.Tensor,
    boxes: torch.Tensor,
    other: torch.Tensor,
    other_boxes: torch.Tensor,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend two training images with a Beta(32, 32) weight (close to half each); keep all boxes."""
    weight = rng.beta(32.0, 32.0)
    blended = image.float() * weight + other.float() * (1 - weight)
    return blended.round_().to(torch.uint8), torch.cat([boxes, other_boxes])


def hue_rotation(fraction: float) -> np.ndarray:
    """The 3×3 RGB map that shifts hue by `fraction` of the colour circle: a rotation of the
    chroma plane in YIQ. Greys stay grey. (torchvision's adjust_hue converts to HSV and back,
    about ten times slower on a CPU worker; for augmentation a chroma rotation shifts hue just as
    well.)"""
    angle = 2 * math.pi * fraction
    rotation = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    return np.linalg.inv(RGB_TO_YIQ) @ rotation @ RGB_TO_YIQ


def augment_colour(image: torch.Tensor, augmentation: Augmentation, rng: np.random.Generator) -> torch.Tensor:
    """Random hue, saturation and value gains within ±hsv_h, ±hsv_s, ±hsv_v, rounded once.

    Saturation and value act as in YOLOv5's HSV step, so its evolved hsv_s and hsv_v mean the
    same here: saturation scales S = (max − min) / max and keeps each pixel's max channel, so it
    moves brightness too; both clip S and V at their top, keeping the pixel's hue. Hue is a
    chroma rotation (`hue_rotation`) by ±hsv_h of the circle for every colour alike, where
    YOLOv5 multiplies OpenCV's hue angle (so reds barely move).
    """
    gains = rng.uniform(-1, 1, 3) * (augmentation.hsv_h, augmentation.hsv_s, augmentation.hsv_v)
    hue, saturation, value = gains.tolist()
    if not (hue or saturation or value):
        return image
    pixels = image.float()
    if hue:
        red, green, blue = pixels
        pixels = torch.stack([red * r + (green * g + blue * b) for r, g, b in hue_rotation(hue).tolist()])
        pixels.clamp_(0, 255)
    return hsv_gains(pixels, 1 + saturation, 1 + value).round_().to(torch.uint8)


def hsv_gains(pixels: torch.Tensor, saturation: float, value: float) -> torch.Tensor:
    """Float RGB (3, H, W) in 0..255 with HSV's S multiplied by `saturation` and V by `value`,
    each clipped at its top (S at 1, V at 255) as YOLOv5's uint8 HSV step clips them. Works in
    place on `pixels`.

    In RGB: a channel c of a pixel with max V becomes (V − (V − c)·s)·v, with s and v lowered per
    pixel where S or V would pass the top. That keeps the pixel's hue, and needs no round trip
    through HSV.
    """
    top = pixels.amax(dim=0, keepdim=True)
    gain: float | torch.Tensor = saturation
    if saturation > 1:  # S·s ≤ 1 means (V − min)·s ≤ V; a grey (no chroma) takes any gain and stays grey
        gain = torch.div(top, (top - pixels.amin(dim=0, keepdim=True)).clamp_min_(1e-6)).clamp_max_(saturation)
    scale: float | torch.Tensor = value
    if value > 1:
        scale = torch.div(255, top.clamp_min(1e-6)).clamp_max_(value)
    return pixels.sub_(top).mul_(gain * scale).add_(top * scale)


def random_flips(
    image: torch.Tensor, boxes: torch.Tensor, augmentation: Augmentation, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip up-down with probability flipud and left-right with probability fliplr."""
    height, width = image.shape[1:]
    flip_vertical, flip_horizontal = (rng.random(2) < (augmentation.flipud, augmentation.fliplr)).tolist()
    boxes = boxes.clone()
    if flip_vertical:
        image = F.vertical_flip(image)
        boxes[:, [2, 4]] = height - boxes[:, [4, 2]]
    if flip_horizontal:
        image = F.horizontal_flip(image)
        boxes[:, [1, 3]] = width - boxes[:, [3, 1]]
    return image, boxes


@dataclass(frozen=True)
class MultiScale:
    """YOLOv5's --multi-scale: every training batch is resized to a random size from half to one
    and a half times `imgsz`, in steps of the model's largest stride.

    The size is drawn from (seed, iteration) alone, so every DDP rank trains the same size at the
    same step, and a resumed run draws the sizes the straight run drew. Labels are normalised to
    the image, so they need no change.
    """

    imgsz: int
    stride: int
    seed: int

    def size(self, iteration: int) -> int:
        low, high = int(self.imgsz * 0.5), int(self.imgsz * 1.5) + self.stride
        draw = int(np.random.default_rng([self.seed % 2**32, iteration]).integers(low, high))
        return max(self.stride, draw // self.stride * self.stride)

    def __call__(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        """`images` (B, 3, H, W) float model input, resized so its long side is this step's size."""
        scale = self.size(iteration) / max(images.shape[2:])
        if scale == 1:
            return images
        shape = [math.ceil(side * scale / self.stride) * self.stride for side in images.shape[2:]]
        resized = torch.nn.functional.interpolate(images, size=shape, mode="bilinear", align_corners=False)
        return resized.contiguous(memory_format=torch.channels_last)
