"""Top-1 / top-5 accuracy of a classifier on a labelled image folder.

Labels: by default the class index is the position of an image's folder in the sorted list
of class folders (ImageFolder). With ``labels_file`` (one class name per line, e.g.
``imagenet_synsets.txt``) it is the line number of the folder's name. ``label_offset`` is
added (MobileNetV2 from TF has a background class at index 0: offset 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from scipy.special import log_softmax

from onnxopt.calib.capture import make_session
from onnxopt.calib.readers import DataSource, InputSpec, Preprocess, image_geometry, list_images
from onnxopt.errors import UserError
from onnxopt.verify import row_kl


@dataclass
class Accuracy:
    top1: float
    top5: float
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def labelled_images(folder: Path, labels_file: Path | None, label_offset: int,
                    limit: int | None, seed: int) -> tuple[list[Path], np.ndarray]:
    if not folder.is_dir():
        raise UserError(f"--data {folder}: not a folder; give a folder with one sub-folder per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"--data {folder}: no class sub-folders (expected <folder>/<class>/<image>)")
    if labels_file is not None:
        if not labels_file.is_file():
            raise UserError(f"--labels {labels_file}: no such file")
        names = [line.strip().split()[0] for line in labels_file.read_text().splitlines() if line.strip()]
        index = {name: i for i, name in enumerate(names)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise UserError(f"--labels {labels_file} does not list class folder(s) {unknown[:3]}")
    else:
        index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in classes:
        for path in list_images(folder / name):
            paths.append(path)
            labels.append(index[name] + label_offset)
    if not paths:
        raise UserError(f"--data {folder}: no images in the class folders")
    if limit is not None and limit < len(paths):
        keep = np.sort(np.random.default_rng(seed).permutation(len(paths))[:limit])
        paths = [paths[i] for i in keep]
        labels = [labels[i] for i in keep]
    return paths, np.asarray(labels)


def labelled_source(folder: Path, inputs: list[InputSpec], prep: Preprocess, labels_file: Path | None = None,
                    label_offset: int = 0, limit: int | None = None, seed: int = 0) -> tuple[DataSource, np.ndarray]:
    """A labelled image folder as a data source for a single-input classifier, and its labels."""
    if len(inputs) != 1:
        raise UserError(f"evaluation takes single-input classifiers; this model has {len(inputs)} inputs")
    image_geometry(inputs[0], prep)
    paths, labels = labelled_images(folder, labels_file, label_offset, limit, seed)
    return DataSource(inputs, paths=paths, prep=prep, description=f"{len(paths)} labelled images in {folder}"), labels


def refuse_overlap(calib: DataSource, eval_source: DataSource, eval_folder: Path) -> None:
    """Evaluation data must be disjoint from calibration data (else the measured drop flatters)."""
    if calib.paths is None:
        return
    calib_files = {Path(p).resolve() for p in calib.paths}
    shared = [p for p in eval_source.paths if Path(p).resolve() in calib_files]
    if shared:
        raise UserError(f"--eval-data {eval_folder} overlaps the calibration data ({len(shared)} images are in both, "
                        f"e.g. {shared[0]}); evaluate on held-out images, e.g. a test split")


def _logits(session, feeds: dict[str, np.ndarray], labels: np.ndarray, start: int) -> np.ndarray:
    """A classifier's (images, classes) logits on one batch, checked against the labels from ``start`` on."""
    logits = session.run(None, feeds)[0][: len(labels) - start]   # a fixed-batch model's last batch is filled up
    if logits.ndim != 2:
        raise UserError(f"the model's first output has shape {list(logits.shape)}; eval needs (N, classes) logits")
    batch_labels = labels[start:start + len(logits)]
    if batch_labels.max() >= logits.shape[1]:
        raise UserError(f"label {int(batch_labels.max())} is out of range for {logits.shape[1]} outputs; check --labels / --label-offset")
    return logits


def _best_five(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=1)[:, :5]


def top5(model: onnx.ModelProto, source: DataSource, labels: np.ndarray, threads: int = 0,
         batch_size: int = 64, progress=None, label: str = "evaluating") -> np.ndarray:
    """The five highest-scoring classes of ``model`` on each image of ``source``, best first: (N, 5)."""
    session = make_session(model, threads)
    tops = []
    start = 0
    for feeds in source.batches(batch_size):
        tops.append(_best_five(_logits(session, feeds, labels, start)))
        start += len(tops[-1])
        if progress:
            progress(label, start, len(labels))
    return np.concatenate(tops)


def accuracy(tops: np.ndarray, labels: np.ndarray) -> Accuracy:
    return Accuracy(top1=float(np.mean(tops[:, 0] == labels)), top5=float(np.mean((tops == labels[:, None]).any(1))),
                    n=len(labels))


def score(model: onnx.ModelProto, source: DataSource, labels: np.ndarray, threads: int = 0,
          batch_size: int = 64, progress=None) -> Accuracy:
    """Top-1/top-5 of ``model`` on ``source`` with ``labels``."""
    return accuracy(top5(model, source, labels, threads, batch_size, progress), labels)


@dataclass
class PairedAccuracy:
    """A model against its baseline on the same images (``eval --baseline``).

    The drop's standard error is that of a paired difference: per image
    ``d_i = [baseline right] - [model right]`` is -1, 0 or 1, so with ``lost`` images
    (baseline right, model wrong) and ``gained`` ones out of ``n``,
    ``drop = (lost - gained) / n`` and ``var(d) = (lost + gained - n drop^2) / (n - 1)``,
    ``se = sqrt(var(d) / n)``. Only the images where the two disagree carry information:
    350 images and 30 changed answers give about 1.6 points.

    ``kl``: the mean over the images of ``KL(p || q)``, the baseline's class distribution ``p``
    against the model's ``q`` (softmax of the logits), with its standard error ``kl_se``. Every
    image carries information here, not only those whose top-1 class changed, so two models
    compressed from the same baseline are told apart on fewer images than by their top-1.
    """

    model: Accuracy
    baseline: Accuracy
    lost: int
    gained: int
    top1_agreement: float        # the same top-1 class, right or wrong
    kl: float | None = None
    kl_se: float | None = None

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.lost - self.gained) / self.model.n

    @property
    def drop_se_points(self) -> float:
        n = self.model.n
        if n < 2:
            return float("nan")
        drop = (self.lost - self.gained) / n
        return 100.0 * float(np.sqrt(max(self.lost + self.gained - n * drop * drop, 0.0) / (n - 1) / n))

    def to_json(self) -> dict:
        return {**self.model.to_json(), "baseline": {"top1": self.baseline.top1, "top5": self.baseline.top5},
                "top1_drop_points": self.drop_points, "drop_se_points": self.drop_se_points,
                "lost": self.lost, "gained": self.gained, "top1_agreement": self.top1_agreement,
                "kl": self.kl, "kl_se": self.kl_se}


def compare(model: onnx.ModelProto, baseline: onnx.ModelProto, source: DataSource, labels: np.ndarray,
            threads: int = 0, batch_size: int = 64, progress=None) -> PairedAccuracy:
    """``model`` and ``baseline`` scored on the same images (each batch read once, run by both),
    with the paired drop and the KL divergence of their class distributions."""
    session, reference = make_session(model, threads), make_session(baseline, threads)
    ours, theirs, kl = [], [], []
    start = 0
    for feeds in source.batches(batch_size):
        logits, expected = _logits(session, feeds, labels, start), _logits(reference, feeds, labels, start)
        if logits.shape != expected.shape:
            raise UserError(f"the model's logits have shape {list(logits.shape)} and the baseline's {list(expected.shape)}; "
                            f"compare a model with its original")
        ours.append(_best_five(logits))
        theirs.append(_best_five(expected))
        kl.append(row_kl(log_softmax(np.asarray(expected, np.float64), axis=1), logits))
        start += len(logits)
        if progress:
            progress("evaluating both", start, len(labels))
    return paired(np.concatenate(ours), np.concatenate(theirs), labels, np.concatenate(kl))


def paired(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray, kl: np.ndarray | None = None) -> PairedAccuracy:
    """``PairedAccuracy`` from two models' ``top5`` on the same images (and their per-image ``kl``)."""
    right, right_before = ours[:, 0] == labels, theirs[:, 0] == labels
    kl_mean = kl_se = None
    if kl is not None:
        kl_mean = float(kl.mean())
        kl_se = float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else float("nan")
    return PairedAccuracy(accuracy(ours, labels), accuracy(theirs, labels), lost=int(np.sum(right_before & ~right)),
                          gained=int(np.sum(right & ~right_before)), top1_agreement=float(np.mean(ours[:, 0] == theirs[:, 0])),
                          kl=kl_mean, kl_se=kl_se)


def evaluate(model: onnx.ModelProto, inputs: list[InputSpec], folder: Path, prep: Preprocess,
             labels_file: Path | None = None, label_offset: int = 0, limit: int | None = None,
             seed: int = 0, threads: int = 0, batch_size: int = 64, progress=None,
             baseline: onnx.ModelProto | None = None) -> Accuracy | PairedAccuracy:
    """Accuracy of ``model`` on a labelled folder; with ``baseline``, both on the same images (``compare``)."""
    source, labels = labelled_source(folder, inputs, prep, labels_file, label_offset, limit, seed)
    if baseline is None:
        return score(model, source, labels, threads, batch_size, progress)
    return compare(model, baseline, source, labels, threads, batch_size, progress)
