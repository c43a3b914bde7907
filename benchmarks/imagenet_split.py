"""The fixed split of ../shared/data/imagenet-sample used by tests and benchmarks.

The sample has one photo for each of 700 classes. Class folders at even positions of the
sorted folder list are for calibration, odd positions for evaluation (350 + 350), so the two
never share an image. The split is made as two folders of symbolic links:

    python benchmarks/imagenet_split.py OUT_DIR   ->  OUT_DIR/calib/<synset>/..., OUT_DIR/eval/<synset>/...
"""

from __future__ import annotations

import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def make_split(out: Path, sample: Path = SAMPLE) -> tuple[Path, Path]:
    classes = sorted(p for p in sample.iterdir() if p.is_dir())
    for index, folder in enumerate(classes):
        part = out / ("calib" if index % 2 == 0 else "eval") / folder.name
        part.mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir()):
            link = part / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return out / "calib", out / "eval"


if __name__ == "__main__":
    calib, evaluation = make_split(Path(sys.argv[1] if len(sys.argv) > 1 else "out/imagenet-split"))
    print(calib, evaluation)
