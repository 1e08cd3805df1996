"""runtime.v1.ImageService: validates CRI image requests and hands them to the ImageManager."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.images.auth import Auth
from shimd.images.manager import Image, ImageManager

if TYPE_CHECKING:
    from shimd.cri.deps import CriDeps

STREAM_BATCH = 100


def _ref(spec: cri.ImageSpec | None, required: bool = True) -> str:
    ref = (spec.image if spec else "").strip()
    if required and not ref:
        raise errors.InvalidArgument("image.image: required")
    return ref


def _auth(a: cri.AuthConfig | None) -> Auth | None:
    if a is None:
        return None
    auth = Auth(username=a.username, password=a.password, auth=a.auth, server_address=a.server_address,
                identity_token=a.identity_token, registry_token=a.registry_token)
    return None if auth.empty else auth


def to_cri(img: Image) -> cri.Image:
    out = cri.Image(id=img.id, repo_tags=list(img.repo_tags), repo_digests=list(img.repo_digests), size=img.size,
                    spec=cri.ImageSpec(image=img.id), pinned=img.pinned)
    user = str((img.config.get("config") or {}).get("User") or "")
    name = user.split(":", 1)[0]
    if name.isdigit():
        out.uid = cri.Int64Value(value=int(name))
    elif name:
        out.username = name
    return out


class ImageService(cri.ImageServiceBase):
    def __init__(self, deps: CriDeps) -> None:
        self.d = deps

    @property
    def images(self) -> ImageManager:
        if self.d.images is None:
            raise errors.Unavailable("image service is not started")
        return self.d.images  # type: ignore[no-any-return]

    async def list_images(self, list_images_request: cri.ListImagesRequest) -> cri.ListImagesResponse:
        f = list_images_request.filter
        ref = _ref(f.image if f else None, required=False)
        return cri.ListImagesResponse(images=[to_cri(i) for i in self.images.list(ref)])

    async def stream_images(self, stream_images_request: cri.StreamImagesRequest
                            ) -> AsyncIterator[cri.StreamImagesResponse]:
        f = stream_images_request.filter
        found = [to_cri(i) for i in self.images.list(_ref(f.image if f else None, required=False))]
        for start in range(0, len(found), STREAM_BATCH):
            yield cri.StreamImagesResponse(images=found[start:start + STREAM_BATCH])

    async def image_status(self, image_status_request: cri.ImageStatusRequest) -> cri.ImageStatusResponse:
        img = self.images.get(_ref(image_status_request.image))
        if img is None:
            return cri.ImageStatusResponse()  # unknown image: empty answer, not an error
        resp = cri.ImageStatusResponse(image=to_cri(img))
        if image_status_request.verbose:
            m = self.images
            resp.info = {"info": json.dumps({
                "id": img.id,
                "manifestDigests": m.manifest_digests(img.id),
                "chainIDs": m.chain_ids(img.id),
                "snapshotter": m.snapshot_mode,
                "snapshots": img.layers,
                "imageSpec": img.config,
            })}
        return resp

    async def pull_image(self, pull_image_request: cri.PullImageRequest) -> cri.PullImageResponse:
        start = time.monotonic()
        img = await self.images.pull(_ref(pull_image_request.image), _auth(pull_image_request.auth))
        if self.d.metrics is not None:
            self.d.metrics.metrics.record_pull(img.size, time.monotonic() - start)
        return cri.PullImageResponse(image_ref=img.id)

    async def remove_image(self, remove_image_request: cri.RemoveImageRequest) -> cri.RemoveImageResponse:
        await self.images.remove(_ref(remove_image_request.image))
        return cri.RemoveImageResponse()

    async def image_fs_info(self, image_fs_info_request: cri.ImageFsInfoRequest) -> cri.ImageFsInfoResponse:
        u = await self.images.fs_info()
        usage = cri.FilesystemUsage(timestamp=time.time_ns(), fs_id=cri.FilesystemIdentifier(mountpoint=u.mountpoint),
                                    used_bytes=cri.UInt64Value(value=u.used_bytes),
                                    inodes_used=cri.UInt64Value(value=u.inodes_used))
        return cri.ImageFsInfoResponse(image_filesystems=[usage])
