"""runtime.v1.ImageService."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shimd.api.runtime import v1 as cri

if TYPE_CHECKING:
    from shimd.daemon import Daemon


class ImageService(cri.ImageServiceBase):
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
