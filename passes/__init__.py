"""Compression passes (installed as onnxopt.passes)."""
