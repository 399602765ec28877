"""histotransfer: transfer learning for histopathology whole-slide images."""

__version__ = "0.1.0"
