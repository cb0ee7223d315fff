"""toolchain: export-and-optimize ONNX Runtime graphs for length-adaptive and early-exit encoders."""

__version__ = "0.1.0"
