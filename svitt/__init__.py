"""SViTT: sparse video-text transformers (edge + node sparsity) and SViTT-Ego."""

__version__ = "0.1.0"
