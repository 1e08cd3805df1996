"""Images: OCI registry pulls, a content-addressed blob store and per-layer snapshots."""

from shimd.images.auth import Auth
from shimd.images.manager import Image, ImageManager
from shimd.images.store import FsUsage

__all__ = ["Auth", "FsUsage", "Image", "ImageManager"]
