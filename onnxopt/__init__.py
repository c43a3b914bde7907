"""onnxopt: data-driven compression of trained CNNs in ONNX, without fine-tuning."""

__version__ = "0.1.0"
