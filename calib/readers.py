"""Calibration and evaluation data: image folders, .npy/.npz arrays, preprocessing presets.

Preprocessing of an image, in order: decode (RGB, or L for a 1-channel model), resize the
shorter side to ``resize`` (bilinear) and centre-crop ``size``, or, without ``resize``, resize
straight to ``size`` when the image differs; then ``x * scale``, ``(x - mean) / std`` per
channel, channel order, NCHW float32 (NHWC for a model whose input is laid out so).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxopt.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int] | None = None      # final (H, W); None: the model's input size
    resize: int | None = None                # shorter side before the centre crop
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    channel_order: str = "rgb"               # "rgb" or "bgr"

    def describe(self) -> str:
        size = "model" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        resize = f"resize {self.resize}, centre-crop " if self.resize else ""
        return f"{resize}{size}, x*{self.scale:g}, mean {list(self.mean)}, std {list(self.std)}, {self.channel_order.upper()}"


PRESETS: dict[str, Preprocess] = {
    "cifar10": Preprocess(size=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "imagenet": Preprocess(size=(224, 224), resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "mobilenet": Preprocess(size=(224, 224), resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "fashion-mnist": Preprocess(size=(28, 28), mean=(0.2860,), std=(0.3530,)),
}


def make_preprocess(
    preset: str | None = None,
    size: int | None = None,
    resize: int | None = None,
    mean: str | None = None,
    std: str | None = None,
    scale: float | None = None,
    channel_order: str | None = None,
) -> Preprocess:
    """A preset (if any) with explicit options on top."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else Preprocess()
    changes: dict = {}
    if size is not None:
        if size <= 0:
            raise UserError(f"--size must be positive, got {size}")
        changes["size"] = (size, size)
    if resize is not None:
        changes["resize"] = resize
    for key, text in (("mean", mean), ("std", std)):
        if text is not None:
            try:
                changes[key] = tuple(float(v) for v in text.split(","))
            except ValueError:
                raise UserError(f"--{key} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None
    if scale is not None:
        changes["scale"] = scale
    if channel_order is not None:
        if channel_order.lower() not in ("rgb", "bgr"):
            raise UserError(f"--channel-order must be rgb or bgr, got {channel_order!r}")
        changes["channel_order"] = channel_order.lower()
    result = replace(base, **changes)
    if any(s == 0 for s in result.std):
        raise UserError("--std must not contain 0")
    return result


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursively), sorted."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    ]
    return [Path(f) for f in sorted(files)]   # sorting strings: Path comparisons are slow


def load_image(path: Path, prep: Preprocess, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One preprocessed image, (C, H, W) float32."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if prep.resize:
                w, h = img.size
                ratio = prep.resize / min(w, h)
                img = img.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), Image.BILINEAR)
                w, h = img.size
                top, left = (h - size[0]) // 2, (w - size[1]) // 2
                if top < 0 or left < 0:
                    raise UserError(f"--resize {prep.resize} is smaller than the crop {size[0]}x{size[1]}")
                img = img.crop((left, top, left + size[1], top + size[0]))
            elif img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot decode image ({exc.__class__.__name__}); remove or replace the file") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if channels == 3 and prep.channel_order == "bgr":
        array = array[:, :, ::-1]
    array = array * prep.scale
    mean = np.asarray(prep.mean, np.float32)
    std = np.asarray(prep.std, np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise UserError(f"--mean/--std have {mean.size}/{std.size} values but the model takes {channels} channels")
    array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


@dataclass
class InputSpec:
    """A model input: name and shape (symbolic dims as str or None)."""

    name: str
    shape: list


class DataSource:
    """A set of samples for a model's inputs, read lazily in batches.

    ``paths``: image files (preprocessed on read); or ``arrays``: input name -> array with
    samples on the first axis (used as is).
    """

    def __init__(self, inputs: list[InputSpec], paths: list[Path] | None = None,
                 arrays: dict[str, np.ndarray] | None = None, prep: Preprocess | None = None,
                 description: str = ""):
        self.inputs = inputs
        self.paths = paths
        self.arrays = arrays
        self.prep = prep
        self.description = description

    def __len__(self) -> int:
        if self.paths is not None:
            return len(self.paths)
        return len(next(iter(self.arrays.values())))

    def subset(self, indices) -> DataSource:
        indices = list(indices)
        if self.paths is not None:
            return DataSource(self.inputs, paths=[self.paths[i] for i in indices], prep=self.prep, description=self.description)
        return DataSource(self.inputs, arrays={k: v[indices] for k, v in self.arrays.items()}, description=self.description)

    def join(self, other: DataSource) -> DataSource:
        """This source's samples, then ``other``'s (both read from the same model inputs)."""
        if self.paths is not None and other.paths is not None:
            return DataSource(self.inputs, paths=self.paths + other.paths, prep=self.prep, description=self.description)
        if self.arrays is not None and other.arrays is not None and self.arrays.keys() == other.arrays.keys():
            return DataSource(self.inputs, arrays={k: np.concatenate([v, other.arrays[k]]) for k, v in self.arrays.items()},
                              description=self.description)
        raise ValueError("cannot join an image folder's samples with arrays, or arrays of other inputs")

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one sample of each input (what dynamic model dims take in calibration)."""
        if self.paths is not None:
            channels, size = image_geometry(self.inputs[0], self.prep)
            return {self.inputs[0].name: (*size, channels) if is_nhwc(self.inputs[0]) else (channels, *size)}
        return {name: tuple(array.shape[1:]) for name, array in self.arrays.items()}

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model's inputs fix (a static first dimension), if any."""
        sizes = {spec.shape[0] for spec in self.inputs if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0}
        return sizes.pop() if len(sizes) == 1 else None

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` samples; for a model with a fixed batch size, batches of
        exactly that size, the last one filled up by repeating samples from the start."""
        fixed = self.fixed_batch
        batch_size = fixed or batch_size
        for start in range(0, len(self), batch_size):
            stop = start + batch_size if fixed else min(start + batch_size, len(self))
            indices = np.arange(start, stop) % len(self)
            if self.paths is not None:
                spec = self.inputs[0]
                channels, size = image_geometry(spec, self.prep)
                batch = np.stack([load_image(self.paths[i], self.prep, channels, size) for i in indices])
                yield {spec.name: batch.transpose(0, 2, 3, 1) if is_nhwc(spec) else batch}
            else:
                yield {name: array[indices] if fixed else array[start:stop] for name, array in self.arrays.items()}


def is_nhwc(spec: InputSpec) -> bool:
    """An image input laid out (N, H, W, C) (TensorFlow exporters; a Transpose follows)."""
    shape = spec.shape
    return len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3)


def image_geometry(spec: InputSpec, prep: Preprocess) -> tuple[int, tuple[int, int]]:
    """Channels and (H, W) an image must have for ``spec``; checks the preset against the model."""
    shape = spec.shape
    if len(shape) != 4:
        raise UserError(f"input {spec.name!r} has shape {shape}; image data needs an NCHW or NHWC input (use --calib data.npz instead)")
    if is_nhwc(spec):
        shape = [shape[0], shape[3], shape[1], shape[2]]
    channels = shape[1]
    if not isinstance(channels, int) or channels not in (1, 3):
        raise UserError(f"input {spec.name!r} has {channels} channels; images give 1 or 3 (use --calib data.npz instead)")
    model_hw = tuple(shape[2:])
    static = all(isinstance(d, int) and d > 0 for d in model_hw)
    if prep.size is None:
        if not static:
            raise UserError(f"input {spec.name!r} has dynamic spatial dims {list(model_hw)}; give --size or a --preset")
        return channels, model_hw
    if static and tuple(prep.size) != model_hw:
        raise UserError(
            f"preprocessing gives {prep.size[0]}x{prep.size[1]} images but input {spec.name!r} expects "
            f"{model_hw[0]}x{model_hw[1]}; pick the matching --preset or --size {model_hw[0]}"
        )
    return channels, tuple(prep.size)


def _load_array(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{path}: cannot read as .npy/.npz without pickle ({exc.__class__.__name__})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    return loaded


def _check_array(name: str, array: np.ndarray, spec: InputSpec, origin: str) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise UserError(f"{origin}: array for input {name!r} has dtype {array.dtype}; expected float32")
    array = np.asarray(array, np.float32)
    if array.ndim != len(spec.shape):
        raise UserError(f"{origin}: array for input {name!r} has shape {list(array.shape)} but the model expects {spec.shape} (samples on the first axis)")
    for got, want in zip(array.shape[1:], spec.shape[1:]):
        if isinstance(want, int) and want > 0 and got != want:
            raise UserError(f"{origin}: array for input {name!r} has shape {list(array.shape)} but the model expects {spec.shape}")
    if not np.isfinite(array).all():
        raise UserError(f"{origin}: array for input {name!r} contains NaN or Inf; clean the calibration data")
    return array


def open_source(spec_text: str | list[str], inputs: list[InputSpec], prep: Preprocess | None, what: str = "--calib") -> DataSource:
    """Open calibration data: an image folder, a .npy/.npz file, or ``name:file.npy`` pairs."""
    specs = [spec_text] if isinstance(spec_text, str) else list(spec_text)
    by_name = {spec.name: spec for spec in inputs}
    if len(specs) == 1 and ":" not in specs[0]:
        path = Path(specs[0])
        if not path.exists():
            raise UserError(f"{what} {path}: no such file or folder")
        if path.is_dir():
            paths = list_images(path)
            if not paths:
                raise UserError(f"{what} {path}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            if len(inputs) != 1:
                raise UserError(f"the model has {len(inputs)} inputs; image folders feed one input, use name:file.npy per input")
            prep = prep or Preprocess()
            image_geometry(inputs[0], prep)  # fail early on a preset/shape mismatch
            return DataSource(inputs, paths=paths, prep=prep, description=f"{len(paths)} images in {path}")
        loaded = _load_array(path)
        if isinstance(loaded, dict):
            missing = [s.name for s in inputs if s.name not in loaded]
            if len(loaded) == 1 and len(inputs) == 1:
                loaded = {inputs[0].name: next(iter(loaded.values()))}
            elif missing:
                raise UserError(f"{path}: no array for input(s) {missing}; key the .npz arrays by input name ({list(loaded)} found)")
            arrays = {s.name: _check_array(s.name, loaded[s.name], s, str(path)) for s in inputs}
        else:
            if len(inputs) != 1:
                raise UserError(f"the model has {len(inputs)} inputs; give an .npz keyed by input name or name:file.npy pairs")
            arrays = {inputs[0].name: _check_array(inputs[0].name, loaded, inputs[0], str(path))}
    else:
        arrays = {}
        for item in specs:
            name, _, file = item.partition(":")
            if name not in by_name:
                raise UserError(f"{what} {item}: the model has no input {name!r} (inputs: {list(by_name)})")
            if not Path(file).is_file():
                raise UserError(f"{what} {item}: no such file {file}")
            loaded = _load_array(Path(file))
            if isinstance(loaded, dict):
                raise UserError(f"{what} {item}: name:file takes a .npy file, not .npz")
            arrays[name] = _check_array(name, loaded, by_name[name], file)
        missing = [s.name for s in inputs if s.name not in arrays]
        if missing:
            raise UserError(f"{what}: no data for input(s) {missing}")
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise UserError(f"{what}: arrays must have the same, non-zero number of samples (got {sorted(counts)})")
    return DataSource(inputs, arrays=arrays, description=f"{counts.pop()} samples from {', '.join(specs)}")


def measurement_samples(calib: DataSource | None, holdout: DataSource | None) -> DataSource | None:
    """Where a pipeline measures output differences: the held-out samples, or without them the
    first 128 calibration samples (None without either)."""
    if holdout is not None and len(holdout):
        return holdout
    return calib.subset(range(min(128, len(calib)))) if calib is not None and len(calib) else None


def split_source(source: DataSource, calib_size: int, holdout_size: int, seed: int) -> tuple[DataSource, DataSource]:
    """Disjoint, seeded calibration and held-out subsets of ``source``."""
    order = np.random.default_rng(seed).permutation(len(source))
    holdout = min(holdout_size, max(1, len(source) // 5)) if len(source) > 1 else 0
    calib = order[holdout: holdout + calib_size]
    if len(calib) == 0:
        raise UserError("no calibration samples left after setting aside held-out samples; give more data")
    return source.subset(sorted(calib)), source.subset(sorted(order[:holdout]))
