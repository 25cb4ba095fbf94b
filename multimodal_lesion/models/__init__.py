"""Models: a timm image branch, a metadata branch and registered fusion heads, one ``LesionModel`` class.

``create_model(name, meta_dim=...)`` builds a registered model; ``list_models()`` names them.
"""

from .fusion import LesionModel  # importing fusion and map_fusion registers the models
from .image_branch import FLIPS, ImageBranch, embed_images, flipped_views
from .map_fusion import MetaLayout
from .metadata_branch import MetadataBranch
from .registry import check_model_mode, create_model, fuses_on_maps, list_models, model_description, register_model
from .weights import load_image_weights

__all__ = [
    "FLIPS",
    "ImageBranch",
    "LesionModel",
    "MetaLayout",
    "MetadataBranch",
    "check_model_mode",
    "create_model",
    "embed_images",
    "flipped_views",
    "fuses_on_maps",
    "list_models",
    "load_image_weights",
    "model_description",
    "register_model",
]
