"""holons.data: image readers, archive index, decode-once cache, datasets and splits.

``LoadRadiograph`` / ``LoadRadiographd`` (MONAI transforms) are imported on first use, so that
``import holons.data`` stays light (no torch / MONAI) for index and cache worker processes.
"""

from holons.data.image import RadiographImage, UnreadableImage
from holons.data.readers import read_image

__all__ = ["LoadRadiograph", "LoadRadiographd", "RadiographImage", "UnreadableImage", "read_image"]


def __getattr__(name: str):
    if name in ("LoadRadiograph", "LoadRadiographd"):
        from holons.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module 'holons.data' has no attribute {name!r}")
