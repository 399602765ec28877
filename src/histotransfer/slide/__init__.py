"""Whole-slide image readers: OpenSlide, tiffslide, plain images, and direct tiled-TIFF tile decoding."""

from .base import Slide, magnification_to_mpp, slide_id_of
from .identity import check_identity, slide_identity
from .listing import SlideEntry, list_slides, locate_slide, slide_index
from .open import SLIDE_SUFFIXES, open_slide

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideEntry", "check_identity", "list_slides", "locate_slide",
           "magnification_to_mpp", "open_slide", "slide_id_of", "slide_identity", "slide_index"]
