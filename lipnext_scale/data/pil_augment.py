"""PIL versions of the random-resized crop and RandAugment for the webdataset backend (no torchvision).

They follow DALI's definitions (``dali_loader``) so both backends train with the same distribution of
augmentations, not the same random draws:

- RRC: torchvision's / DALI's algorithm — up to ``RRC_ATTEMPTS`` tries of an area fraction uniform in
  ``RRC_SCALE`` and an aspect ratio log-uniform in ``RRC_RATIO``, else the whole image clamped to the
  ratio range, centred; the window is resized to ``size x size`` (bilinear, antialiased).
- RandAugment: DALI's default suite (``nvidia.dali.auto_aug.rand_augment.get_rand_augment_suite`` with
  image-relative translation), ``n`` ops drawn uniformly with replacement, each at magnitude bin ``m``
  of ``bins`` (``linspace(lo, hi, bins)[m]``) with a random sign for the signed ops. Known per-op
  differences to DALI: ``equalize`` uses PIL's histogram formula (DALI follows OpenCV), ``sharpness``
  leaves the 1-pixel border unfiltered (PIL), and the shear/rotate/translate resampling is PIL's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps

from .loader_base import RRC_ATTEMPTS, RRC_RATIO, RRC_SCALE

# (name, magnitude at bin 0, magnitude at the last bin, randomly negated) — DALI's default suite.
_MAX_TRANSLATE_REL = 100 / 224
RAND_AUGMENT_SUITE: tuple[tuple[str, float, float, bool], ...] = (
    ("translate_x", 0.0, _MAX_TRANSLATE_REL, True),
    ("translate_y", 0.0, _MAX_TRANSLATE_REL, True),
    ("shear_x", 0.0, 0.3, True),
    ("shear_y", 0.0, 0.3, True),
    ("rotate", 0.0, 30.0, True),
    ("brightness", 0.0, 0.9, True),
    ("contrast", 0.0, 0.9, True),
    ("color", 0.0, 0.9, True),
    ("sharpness", 0.0, 0.9, True),
    ("posterize", 8.0, 4.0, False),
    ("solarize", 256.0, 0.0, False),
    ("equalize", 0.0, 0.0, False),
    ("auto_contrast", 0.0, 0.0, False),
    ("identity", 0.0, 0.0, False),
)


def random_resized_crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` of a random-resized-crop window."""
    area = width * height
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(RRC_ATTEMPTS):
        target_area = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, max(1, round(width / RRC_RATIO[0]))
    elif ratio > RRC_RATIO[1]:
        w, h = max(1, round(height * RRC_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def _affine(img: Image.Image, inverse: tuple[float, ...], fill: int) -> Image.Image:
    """Apply the affine map whose *inverse* (output -> input pixel) is ``inverse`` (PIL's convention)."""
    return img.transform(
        img.size, Image.Transform.AFFINE, inverse, resample=Image.Resampling.BILINEAR, fillcolor=(fill,) * 3
    )


def _op(name: str, magnitude: float, fill: int) -> Callable[[Image.Image], Image.Image]:
    m = magnitude
    ops: dict[str, Callable[[Image.Image], Image.Image]] = {
        # DALI: warp_affine with inverse_map=False of translation(offset) / shear(shear) about the origin.
        "translate_x": lambda im: _affine(im, (1, 0, -m * im.width, 0, 1, 0), fill),
        "translate_y": lambda im: _affine(im, (1, 0, 0, 0, 1, -m * im.height), fill),
        "shear_x": lambda im: _affine(im, (1, -m, 0, 0, 1, 0), fill),
        "shear_y": lambda im: _affine(im, (1, 0, 0, -m, 1, 0), fill),
        "rotate": lambda im: im.rotate(m, resample=Image.Resampling.BILINEAR, fillcolor=(fill,) * 3),
        "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1 + m),
        "contrast": lambda im: ImageEnhance.Contrast(im).enhance(1 + m),
        "color": lambda im: ImageEnhance.Color(im).enhance(1 + m),
        "sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(1 + m),
        # DALI's poster_mask_uint8: keep round(m) bits, at least 1.
        "posterize": lambda im: ImageOps.posterize(im, min(8, max(1, round(m)))),
        "solarize": lambda im: ImageOps.solarize(im, threshold=m),
        "equalize": ImageOps.equalize,
        "auto_contrast": ImageOps.autocontrast,
        "identity": lambda im: im,
    }
    return ops[name]


def rand_augment(
    img: Image.Image, rng: random.Random, *, n: int, m: int, bins: int, fill: int
) -> Image.Image:
    """RandAugment of an RGB image: ``n`` ops of :data:`RAND_AUGMENT_SUITE` at magnitude bin ``m``."""
    if not 0 <= m < bins:
        raise ValueError(f"magnitude bin m={m} must be in [0, {bins})")
    for _ in range(n):
        name, lo, hi, signed = RAND_AUGMENT_SUITE[rng.randrange(len(RAND_AUGMENT_SUITE))]
        magnitude = lo + (hi - lo) * m / max(1, bins - 1)
        if signed and rng.random() < 0.5:
            magnitude = -magnitude
        img = _op(name, magnitude, fill)(img)
    return img
