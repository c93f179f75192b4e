"""LiteASR: Whisper with a PCA-compressed encoder (arXiv 2502.20583), and the tools to build and serve it."""

__version__ = "0.1.0"
