#!/usr/bin/env python3
"""Train a width-scaled CIFAR VGG-16 (with BatchNorm) on CIFAR-10 and export it to ONNX.

Architecture: the usual CIFAR variant of VGG-16: 13 x (Conv3x3 + BN + ReLU) with max-pools after
each block, cfg [64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M] multiplied by
--width (default 0.25 -> 16..128 channels), then Flatten + Linear(C, 10).

Data: ImageFolder layout <data-root>/{train,test}/<class>/*.jpg; class index = position in
the sorted folder list. The decoded images are cached once as uint8 arrays in --cache-dir.
Preprocessing (= onnxopt's `cifar10` preset): RGB, /255, mean (0.485,0.456,0.406),
std (0.229,0.224,0.225), 32x32. Augmentation: random crop (4 px zero padding) + h-flip.

Outputs: --onnx (opset 17, IR 8, input "input" [N,3,32,32], output "logits" [N,10],
BatchNormalization nodes kept) and a per-epoch CSV log (--log).

Usage (models venv with torch/onnx/onnxruntime):
  nice -n 19 .venv-models/bin/python models/train_vgg16_cifar.py
"""
import argparse
import csv
import os
import random
import time

import numpy as np
from onnx_export import export_onnx, ort_logits  # models/onnx_export.py (the script folder is on sys.path)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_folder(root, cache_dir, split):
    """Decode <root>/<split>/<class>/*.jpg once into a uint8 [N,32,32,3] array (cached)."""
    from PIL import Image

    os.makedirs(cache_dir, exist_ok=True)
    cache = os.path.join(cache_dir, "cifar10_%s_uint8.npz" % split)
    d = os.path.join(root, split)
    classes = sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)))
    if os.path.exists(cache):
        z = np.load(cache)
        if list(z["classes"]) == classes:
            return z["x"], z["y"], classes
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(d, name))):
            with Image.open(os.path.join(d, name, f)) as im:
                a = np.asarray(im.convert("RGB"))
            assert a.shape == (32, 32, 3), (f, a.shape)
            xs.append(a)
            ys.append(c)
    x, y = np.stack(xs), np.array(ys, dtype=np.int64)
    np.savez(cache, x=x, y=y, classes=np.array(classes))
    return x, y, classes


def to_input(x_uint8):
    """uint8 NHWC -> normalised float32 NCHW."""
    return np.ascontiguousarray(((x_uint8.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2))


def build_model(width, num_classes=10):
    import torch.nn as nn

    layers, cin = [], 3
    for v in CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            c = int(round(v * width))
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
    layers += [nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def load_init(path, model):
    """State dict from a .pt file, or from an ONNX file exported by this script: torch.onnx keeps the
    parameter and BN-buffer names as initializer names; only BN's ``num_batches_tracked`` counters
    are not exported (kept at their current value, they do not affect training with momentum)."""
    import torch

    if not path.endswith(".onnx"):
        return torch.load(path, map_location="cpu")
    import onnx
    from onnx import numpy_helper

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(path).graph.initializer}
    state = model.state_dict()
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit(f"{path} lacks weights {missing[:3]}...: not a VGG-16 of this width exported by this script")
    return {k: weights.get(k, v) for k, v in state.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10"))  # ../shared
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache"))
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-batches", type=int, default=0,
                    help="only time this many training steps and exit (to choose width/epochs)")
    ap.add_argument("--onnx", default=os.path.join(HERE, "vgg16_cifar10.onnx"))
    ap.add_argument("--log", default=os.path.join(HERE, "vgg16_cifar10_train_log.csv"))
    ap.add_argument("--init", default=None,
                    help="start from these weights instead of random ones (a fine-tuning phase): a torch "
                         "state_dict (.pt) or an ONNX file this script exported (.onnx, initializers by name)")
    ap.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle",
                    help="onecycle: warm-up to --lr then anneal; cosine: anneal from --lr to 0 (for --init)")
    ap.add_argument("--append-log", action="store_true",
                    help="append to --log, continuing its epoch numbering and elapsed time")
    ap.add_argument("--checkpoint", default=None, help="where to save the torch state_dict (default: cache dir)")
    args = ap.parse_args()

    import torch
    import torch.nn as nn

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    cl = torch.channels_last  # NHWC: ~2.5x faster CPU training than NCHW
    model = build_model(args.width).to(memory_format=cl)
    if args.init:
        model.load_state_dict(load_init(args.init, model))
        print("initialised from", args.init, flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print("VGG-16 width %.3g: %d parameters" % (args.width, nparams), flush=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd, nesterov=True)
    lossf = nn.CrossEntropyLoss()

    if args.time_batches:
        x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=cl)
        y = torch.randint(0, 10, (args.batch_size,))
        ts = []
        for _ in range(args.time_batches + 2):
            t0 = time.time()
            loss = lossf(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.time() - t0)
        per = float(np.median(ts[2:]))
        print("%.3fs/step -> %.0fs/epoch (50k images, excl. eval)" % (per, per * 50000 / args.batch_size))
        return

    t_load = time.time()
    xtr_u8, ytr, classes = load_folder(args.data_root, args.cache_dir, "train")
    xte_u8, yte, classes_te = load_folder(args.data_root, args.cache_dir, "test")
    assert classes == classes_te
    print("train %s test %s classes %s (%.1fs)" % (xtr_u8.shape, xte_u8.shape, classes, time.time() - t_load), flush=True)
    Xtr = torch.from_numpy(to_input(xtr_u8))
    Ytr = torch.from_numpy(ytr)
    Xte = to_input(xte_u8)
    Xtr_pad = torch.nn.functional.pad(Xtr, (4, 4, 4, 4))  # zero padding in normalised space

    n = len(Xtr)
    steps = n // args.batch_size  # drop the last incomplete batch
    if args.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps,
                                                    pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps, eta_min=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    ar = torch.arange(32)
    ep0, elapsed0 = 0, 0.0
    if args.append_log and os.path.exists(args.log):
        with open(args.log) as f:
            rows = list(csv.DictReader(f))
        if rows:
            ep0, elapsed0 = int(rows[-1]["epoch"]), float(rows[-1]["elapsed_s"])
        logf = open(args.log, "a", newline="")
        w = csv.writer(logf)
    else:
        logf = open(args.log, "w", newline="")
        w = csv.writer(logf)
        w.writerow(["epoch", "lr_end", "train_loss", "train_acc", "test_acc", "epoch_time_s", "elapsed_s"])
    t_start = time.time() - elapsed0
    for ep in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        tot_loss, correct, seen = 0.0, 0, 0
        for b in range(steps):
            ib = perm[b * args.batch_size:(b + 1) * args.batch_size]
            B = len(ib)
            # random 32x32 crop of the 40x40 zero-padded image, then random horizontal flip
            ox = torch.randint(0, 9, (B,), generator=gen)
            oy = torch.randint(0, 9, (B,), generator=gen)
            flip = torch.rand(B, generator=gen) < 0.5
            rows = (oy[:, None] + ar[None, :])  # B,32
            cols = (ox[:, None] + ar[None, :])  # B,32
            cols = torch.where(flip[:, None], cols.flip(1), cols)
            xb = Xtr_pad[ib[:, None, None, None], torch.arange(3)[None, :, None, None],
                         rows[:, None, :, None], cols[:, None, None, :]].contiguous(memory_format=cl)
            yb = Ytr[ib]
            out = model(xb)
            loss = lossf(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * B
            correct += (out.argmax(1) == yb).sum().item()
            seen += B
        train_time = time.time() - t0
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(torch.from_numpy(Xte[i:i + 1000]).contiguous(memory_format=cl)).argmax(1) for i in range(0, len(Xte), 1000)])
        te_acc = float((pred.numpy() == yte).mean())
        row = [ep0 + ep + 1, "%.5f" % opt.param_groups[0]["lr"], "%.4f" % (tot_loss / seen), "%.4f" % (correct / seen),
               "%.4f" % te_acc, "%.1f" % (time.time() - t0), "%.1f" % (time.time() - t_start)]
        w.writerow(row)
        logf.flush()
        print("epoch %d/%d lr %s loss %s train_acc %s test_acc %s time %ss (train %.1fs) elapsed %ss"
              % (ep0 + ep + 1, ep0 + args.epochs, row[1], row[2], row[3], row[4], row[5], train_time, row[6]), flush=True)
    logf.close()
    print("training time %.1fs (incl. earlier phases in the log)" % (time.time() - t_start), flush=True)

    ckpt = args.checkpoint or os.path.join(args.cache_dir, "vgg16_cifar10_w%g.pt" % args.width)
    torch.save(model.state_dict(), ckpt)

    model = model.to(memory_format=torch.contiguous_format).eval()
    export_onnx(model, args.onnx, torch.from_numpy(Xte[:2]), "onnxopt/models/train_vgg16_cifar.py", 13)
    with torch.no_grad():
        ref = model(torch.from_numpy(Xte[:500])).numpy()
    got = ort_logits(args.onnx, Xte[:500])
    diff = float(np.abs(ref - got).max())
    print("max |ORT - torch| = %.3g" % diff)
    assert diff < 1e-4, diff
    acc = float((ort_logits(args.onnx, Xte).argmax(1) == yte).mean())
    print("ONNX %s: %.2f MB, onnxruntime top-1 on %d test images: %.4f"
          % (args.onnx, os.path.getsize(args.onnx) / 1e6, len(yte), acc))


if __name__ == "__main__":
    main()
