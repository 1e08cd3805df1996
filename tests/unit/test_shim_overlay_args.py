"""The runc shim mounts a container's overlay rootfs with mount(2) itself when it knows every option,
and leaves the rest to mount(8) (issue 18: one helper process less on StartContainer's path)."""

from __future__ import annotations

import pytest

from shims.runc import mounts


@pytest.mark.parametrize(("options", "expected"), [
    (["lowerdir=/a:/b", "upperdir=/u", "workdir=/w"], (0, "lowerdir=/a:/b,upperdir=/u,workdir=/w")),
    (["ro", "nodev", "lowerdir=/a:/b"], (0x1 | 0x4, "lowerdir=/a:/b")),
    (["rw", "index=off", "X-mount.mkdir", "x-systemd.foo", "volatile"], (0, "index=off,volatile")),
    ([], (0, "")),
    (["lowerdir=/a", "bad option"], None),  # only mount(8) would know
])
def test_overlay_syscall_args(options: list[str], expected: tuple[int, str] | None) -> None:
    assert mounts._overlay_syscall_args(options) == expected
