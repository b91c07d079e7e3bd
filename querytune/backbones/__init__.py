"""The single ViT and the loaders that fill it from timm and Hugging Face formats."""

from .loading import check_input_size, load_backbone, save_backbone
from .vit import VisionTransformer, ViTConfig

__all__ = ["ViTConfig", "VisionTransformer", "check_input_size", "load_backbone", "save_backbone"]
