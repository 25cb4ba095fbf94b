"""Skin-lesion classification from a dermoscopic image and patient metadata, explained jointly."""

__version__ = "0.1.0"
