"""SViTT: sparse video-text transformers (edge + node sparsity) and SViTT-Ego."""

__version__ = "0.1.0"


def build_model(cfg: dict):
    """The full SViTT model from the `model` section of the YAML config (keys: MODEL_DEFAULTS in
    svitt/models/svitt.py, VIDEO_DEFAULTS and TEXT_DEFAULTS in the encoders)."""
    from svitt.models.svitt import build_model as _build

    return _build(cfg)
