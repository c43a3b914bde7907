"""Calibration: data readers, activation capture, sufficient statistics (installed as onnxopt.calib)."""
