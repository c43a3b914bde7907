#!/usr/bin/env python3
"""Train the small bundled demo CNN on Fashion-MNIST and export it to ONNX.

Outputs (all under models/demo/ by default):
  fmnist_cnn.onnx                         opset 17, IR 8, input "input" [N,1,28,28] float32,
                                          output "logits" [N,10], BatchNormalization nodes kept
  fashion-mnist/calib/<k_class>/NNNN.png  60 per class from the TRAIN split (8-bit grayscale)
  fashion-mnist/test/<k_class>/NNNN.png   100 per class from the TEST split (8-bit grayscale)

Preprocessing expected by the model: x = pixel/255; x = (x - 0.2860) / 0.3530.

Data: Debian package `dataset-fashion-mnist` (idx files, gzip) in
/usr/share/datasets/fashion-mnist/ (Fashion-MNIST, (c) Zalando SE, MIT licence).

Usage (run with the models venv, which has torch/onnx/onnxruntime):
  nice -n 19 .venv-models/bin/python models/train_demo_fmnist.py
"""
import argparse
import gzip
import os
import random
import shutil
import struct
import time

import numpy as np
from onnx_export import export_onnx, ort_logits  # models/onnx_export.py (the script folder is on sys.path)

MEAN, STD = 0.2860, 0.3530
CLASSES = ["0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat",
           "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot"]
HERE = os.path.dirname(os.path.abspath(__file__))


def read_idx(path):
    """Read an idx file (gzip-compressed or raw)."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path = path + ".gz"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    assert zero == 0 and dtype == 0x08, "expected unsigned-byte idx file: " + path
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_split(data_dir, split):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(data_dir, prefix + "-images-idx3-ubyte"))
    y = read_idx(os.path.join(data_dir, prefix + "-labels-idx1-ubyte")).astype(np.int64)
    assert x.shape[0] == y.shape[0] and x.shape[1:] == (28, 28)
    return x, y


def build_model():
    import torch.nn as nn

    def cbr(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *cbr(1, 32), *cbr(32, 32), nn.MaxPool2d(2),
        *cbr(32, 64), *cbr(64, 64), nn.MaxPool2d(2),
        *cbr(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def preprocess(x_uint8):
    return ((x_uint8.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]


def write_pngs(root, x, y, per_class):
    from PIL import Image

    if os.path.isdir(root):
        shutil.rmtree(root)
    idx = []
    for c, name in enumerate(CLASSES):
        d = os.path.join(root, name)
        os.makedirs(d)
        sel = np.nonzero(y == c)[0][:per_class]  # first N of each class, in dataset order
        for j, i in enumerate(sel):
            Image.fromarray(x[i], mode="L").save(os.path.join(d, "%04d.png" % j), optimize=True)
        idx.extend(sel.tolist())
    return np.array(idx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "demo"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-per-class", type=int, default=60)
    ap.add_argument("--test-per-class", type=int, default=100)
    args = ap.parse_args()

    import torch
    import torch.nn as nn

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    xtr, ytr = load_split(args.data_dir, "train")
    xte, yte = load_split(args.data_dir, "test")
    print("train", xtr.shape, "test", xte.shape, flush=True)
    Xtr, Ytr = torch.from_numpy(preprocess(xtr)), torch.from_numpy(ytr)
    Xte = preprocess(xte)

    model = build_model().to(memory_format=torch.channels_last)  # ~2x faster on CPU
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(Xtr) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    lossf = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()
    for ep in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(Xtr), generator=gen)
        tot_loss, correct = 0.0, 0
        for b in range(steps_per_epoch):
            ib = perm[b * args.batch_size:(b + 1) * args.batch_size]
            xb, yb = Xtr[ib], Ytr[ib]
            # light augmentation: random horizontal flip
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb).contiguous(memory_format=torch.channels_last)
            out = model(xb)
            loss = lossf(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(xb)
            correct += (out.argmax(1) == yb).sum().item()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(torch.from_numpy(Xte[i:i + 1000])).argmax(1) for i in range(0, len(Xte), 1000)])
        te_acc = (pred.numpy() == yte).mean()
        print("epoch %d loss %.4f train_acc %.4f test_acc %.4f time %.1fs"
              % (ep + 1, tot_loss / len(Xtr), correct / len(Xtr), te_acc, time.time() - t0), flush=True)
    print("training time %.1fs" % (time.time() - t_start), flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, "fmnist_cnn.onnx")
    model = model.to(memory_format=torch.contiguous_format).eval()
    export_onnx(model, onnx_path, torch.from_numpy(Xte[:2]), "onnxopt/models/train_demo_fmnist.py", 5)

    # ORT vs torch
    with torch.no_grad():
        ref = model(torch.from_numpy(Xte[:500])).numpy()
    got = ort_logits(onnx_path, Xte[:500])
    diff = float(np.abs(ref - got).max())
    print("max |ORT - torch| = %.3g" % diff)
    assert diff < 1e-4, diff

    logits = ort_logits(onnx_path, Xte)
    full_acc = (logits.argmax(1) == yte).mean()

    base = os.path.join(args.out_dir, "fashion-mnist")
    write_pngs(os.path.join(base, "calib"), xtr, ytr, args.calib_per_class)
    sel = write_pngs(os.path.join(base, "test"), xte, yte, args.test_per_class)
    # accuracy on the bundled subset, re-read from the PNG files to check the round trip
    from PIL import Image
    xs, ys = [], []
    for c, name in enumerate(CLASSES):
        d = os.path.join(base, "test", name)
        for f in sorted(os.listdir(d)):
            xs.append(np.asarray(Image.open(os.path.join(d, f)).convert("L")))
            ys.append(c)
    xs, ys = np.stack(xs), np.array(ys)
    assert np.array_equal(xs, xte[sel])
    sub_acc = (ort_logits(onnx_path, preprocess(xs)).argmax(1) == ys).mean()
    print("ONNX (onnxruntime) top-1: full test set (10000) %.4f, bundled test subset (%d) %.4f"
          % (full_acc, len(ys), sub_acc))


if __name__ == "__main__":
    main()
