from pathlib import Path

import pytest

from shims.runc.mounts import IDMAP_OPTION, OPTIONS_BUDGET, _shorten_lowerdirs, _split_idmap, mount_idmapped_overlay


def test_short_options_stay_absolute() -> None:
    opts = ["lowerdir=/a/1:/a/2", "upperdir=/u", "workdir=/w"]
    assert _shorten_lowerdirs(opts) == (opts, "")


def test_long_lowerdir_lists_become_relative_to_their_common_parent() -> None:
    base = "/var/lib/shimd/images/snapshots/" + "x" * 40
    lowers = [f"{base}/{i:064d}/fs" for i in range(60)]
    opts = ["lowerdir=" + ":".join(lowers), "upperdir=/u", "workdir=/w"]
    out, cwd = _shorten_lowerdirs(opts)
    assert cwd == base
    assert out[0] == "lowerdir=" + ":".join(f"{i:064d}/fs" for i in range(60))
    assert out[1:] == ["upperdir=/u", "workdir=/w"]
    assert len(",".join(out)) < len(",".join(opts))
    assert len(",".join(opts)) > OPTIONS_BUDGET


def test_idmap_option_is_split_off_for_the_kernel() -> None:
    opts = ["lowerdir=/a:/b", "upperdir=/u", "workdir=/w", IDMAP_OPTION + "/run/shimd/ns/p/user"]
    assert _split_idmap(opts) == (opts[:3], "/run/shimd/ns/p/user")
    assert _split_idmap(opts[:3]) == (opts[:3], "")


def test_idmapped_mount_failures_name_the_cause(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="applies to overlay mounts"):
        mount_idmapped_overlay("tmpfs", ["size=1m"], str(tmp_path), "/proc/self/ns/user")
    with pytest.raises(OSError, match="opening the user namespace /nonexistent"):
        mount_idmapped_overlay("overlay", ["lowerdir=/a"], str(tmp_path), "/nonexistent")
