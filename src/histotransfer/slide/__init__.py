"""Whole-slide image readers: OpenSlide, tiffslide, plain images, and direct tiled-TIFF tile decoding."""

from .base import Slide, magnification_to_mpp, slide_id_of
from .open import SLIDE_SUFFIXES, open_slide

__all__ = ["SLIDE_SUFFIXES", "Slide", "magnification_to_mpp", "open_slide", "slide_id_of"]
