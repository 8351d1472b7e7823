"""Model families: the BEiT video encoder, BERT text/fusion encoder, and the assembled SViTT."""

from svitt.models.svitt import SViTT, build_model, resolve_model_config
from svitt.models.text_encoder import TextEncoder
from svitt.models.video_encoder import VideoEncoder

__all__ = ["SViTT", "TextEncoder", "VideoEncoder", "build_model", "resolve_model_config"]
