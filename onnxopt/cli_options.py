"""Command-line options shared by several commands (one definition, one help text)."""

from __future__ import annotations

import typer

from onnxopt.calib.readers import PRESETS

Preset = typer.Option(None, "--preset", help=f"Preprocessing preset: {', '.join(PRESETS)}.")
Size = typer.Option(None, "--size", help="Final image size (square).")
Resize = typer.Option(None, "--resize", help="Resize the shorter side before the centre crop.")
Mean = typer.Option(None, "--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406.")
Std = typer.Option(None, "--std", help="Per-channel std, e.g. 0.229,0.224,0.225.")
Scale = typer.Option(None, "--scale", help="Pixel scale before mean/std (default 1/255).")
ChannelOrder = typer.Option(None, "--channel-order", help="rgb or bgr.")
Labels = typer.Option(None, "--labels", help="Class names, one per line, in class-index order.")
LabelOffset = typer.Option(0, "--label-offset", help="Added to every label (1 for 1001-class TF models).")
EvalData = typer.Option(None, "--eval-data", help="Labelled images (<folder>/<class>/<image>), disjoint from --calib.")
EvalSize = typer.Option(1000, "--eval-size", help="Evaluation images drawn from --eval-data.")
Seed = typer.Option(0, "--seed", help="Seed for sampling images and positions.")
CalibSize = typer.Option(2000, "--calib-size", help="Calibration samples drawn from --calib.")
Rows = typer.Option(8192, "--rows-per-layer", help="Sampled response rows per layer.")
Exclude = typer.Option(None, "--exclude", help="Leave this layer alone (name or glob; repeatable).")
Threads = typer.Option(0, "--threads", help="onnxruntime threads (0: all cores).")
FactorizeClassifier = typer.Option(
    False, "--factorize-classifier",
    help="Low-rank (and auto's), tucker2: also factorise the layer that computes the class scores (left alone by default: "
         "factorising it cost SqueezeNet 4-5 top-1 points on classes the calibration images did not show).")
