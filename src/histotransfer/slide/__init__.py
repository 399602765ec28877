"""Whole-slide image readers: OpenSlide, tiffslide, plain images, and direct tiled-TIFF tile decoding; the
identity of a slide file and the one way slide files are listed."""

from .._lazy import lazy_exports

_EXPORTS = {
    "Slide": ".base",
    "magnification_to_mpp": ".base",
    "slide_id_of": ".base",
    "check_identity": ".identity",
    "identity_differences": ".identity",
    "parse_identity": ".identity",
    "slide_identity": ".identity",
    "IDENTITY_KEYS": ".identity",
    "SlideEntry": ".listing",
    "list_slides": ".listing",
    "locate_slide": ".listing",
    "slide_index": ".listing",
    "SLIDE_SUFFIXES": ".open",
    "open_slide": ".open",
    "TiledTiff": ".tiff_tiles",
    "open_tiled_tiff": ".tiff_tiles",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
