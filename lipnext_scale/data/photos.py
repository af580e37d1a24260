"""An ImageFolder tree of ImageNet-sized JPEGs for benchmarks, without downloading anything.

Random crops (400–640 × 330–427 pixels, ImageNet's typical size, half of them mirrored) of the two
photographs scikit-learn ships (``load_sample_image``: china.jpg and flower.jpg, 640 × 427), saved as
baseline JPEGs at ``out/class<k>/img<i>.JPEG``, image i in class i mod ``classes``. The same arguments give
the same files. ``tools/sample_photos.py`` is the command line.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("china.jpg", "flower.jpg")
WIDTH, HEIGHT = (400, 640), (330, 427)


def write_sample_photos(
    out: str | Path, count: int = 600, classes: int = 4, seed: int = 0, quality: int = 90
) -> list[Path]:
    """Write ``count`` photos under ``out``; returns their paths in the order written."""
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(np.asarray(load_sample_image(name))) for name in PHOTOS]
    rng = random.Random(seed)
    written = []
    for i in range(count):
        photo = photos[rng.randrange(len(photos))]
        w, h = rng.randint(*WIDTH), rng.randint(*HEIGHT)
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        crop = photo.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = Path(out) / f"class{i % classes}" / f"img{i:04d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=quality)
        written.append(path)
    return written
