"""Models: a timm image branch, a metadata branch and registered fusion heads, one ``LesionModel`` class.

``create_model(name, meta_dim=...)`` builds a registered model; ``list_models()`` names them.
"""
from .fusion import LesionModel  # importing fusion registers the models
from .image_branch import FLIPS, ImageBranch, embed_images
from .metadata_branch import MetadataBranch
from .registry import create_model, list_models, model_description, register_model
from .weights import load_image_weights

__all__ = ["create_model", "list_models", "register_model", "model_description", "LesionModel",
           "ImageBranch", "embed_images", "FLIPS", "MetadataBranch", "load_image_weights"]
