from shims.runc.mounts import OPTIONS_BUDGET, _shorten_lowerdirs


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
