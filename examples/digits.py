"""Export scikit-learn's handwritten digits as an ImageFolder: a real target domain.

``sklearn.datasets.load_digits`` holds 1,797 real 8x8 grey-level scans of handwritten digits
(UCI "Optical Recognition of Handwritten Digits", 10 classes), shipped inside scikit-learn, so
no download is needed. This writes them as an ImageNet-style folder that a
:class:`~tasks.data.domains.DomainSpec` of kind ``imagefolder`` reads:

```
{out}/0/digit-0000.png ... {out}/9/digit-1796.png     one folder per digit
{out}/classes.json                                     {"0": "zero", ..., "9": "nine"}
```

Each image is upsampled to the model's input size (bicubic, dark strokes on white as on paper)
and saved as RGB PNG. The splits are carved by the pipeline (``carve`` in the spec), so the same
folder serves any split fractions. Run it, then the pipeline on ``configs/digits.json``::

    python examples/digits.py --out digits-data --size 56
    explain-transfer run --config configs/digits.json --out digits-out

Needs scikit-learn (``pip install -e .[examples]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def export_digits(out: Path, *, size: int = 56, limit_per_class: int | None = None) -> int:
    """Write the digits as ``{out}/{digit}/digit-{index:04d}.png`` plus ``classes.json``.

    Args:
        out: the ImageFolder root (created).
        size: side of the written images in pixels (the model's input size).
        limit_per_class: keep only the first images of each digit (None: all 1,797).

    Returns:
        The number of images written.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[int, int] = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        if limit_per_class is not None and written.get(label, 0) >= limit_per_class:
            continue
        # Values are ink counts 0..16 on a white page: 16 is a fully dark cell.
        grey = (255 - np.clip(pixels, 0, 16) * (255 / 16)).round().astype(np.uint8)
        image = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC)
        folder = out / str(label)
        folder.mkdir(exist_ok=True)
        image.convert("RGB").save(folder / f"digit-{index:04d}.png", compress_level=6)
        written[label] = written.get(label, 0) + 1
    names = {str(digit): name for digit, name in enumerate(DIGIT_NAMES)}
    (out / "classes.json").write_text(json.dumps(names, indent=1) + "\n")
    return sum(written.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="ImageFolder root to write")
    parser.add_argument("--size", type=int, default=56, help="image side (the model's input)")
    parser.add_argument("--limit-per-class", type=int, help="first N images of each digit")
    args = parser.parse_args(argv)
    count = export_digits(Path(args.out), size=args.size, limit_per_class=args.limit_per_class)
    print(f"{count} digit images written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
