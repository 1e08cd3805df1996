#!/usr/bin/env bash
# Installs shimd on this node: the runtimes (runc, runsc, catatonit, CNI plugins), shimd itself in
# its own virtualenv, its config, crictl.yaml, a CNI network when none exists, and the systemd unit.
# Re-running upgrades in place; an existing /etc/shimd/config.toml is never overwritten.
#
#   deploy/install.sh [--prefix /opt/shimd] [--cgroup-driver systemd|cgroupfs] [--wheels DIR]
#                     [--no-packages] [--no-cni] [--no-enable] [--strict]
#
# --wheels DIR installs Python dependencies from a local wheel directory (offline nodes).
# --strict makes a failing `shimd check` fail the installation.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/shimd
CGROUP_DRIVER=""
WHEELS=""
PACKAGES=1
CNI=1
ENABLE=1
STRICT=0
ETC=/etc/shimd
CNI_DIR=/etc/cni/net.d

die() { echo "install: $*" >&2; exit 1; }
say() { echo "install: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --cgroup-driver) CGROUP_DRIVER=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --no-packages) PACKAGES=0; shift ;;
        --no-cni) CNI=0; shift ;;
        --no-enable) ENABLE=0; shift ;;
        --strict) STRICT=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -f "$SRC/pyproject.toml" ] || die "$SRC is not a shimd source tree"
systemd_init=0
[ -d /run/systemd/system ] && systemd_init=1
if [ -z "$CGROUP_DRIVER" ]; then
    # Match the init system, as kubeadm does for kubelet: one cgroup manager per node.
    if [ $systemd_init -eq 1 ]; then CGROUP_DRIVER=systemd; else CGROUP_DRIVER=cgroupfs; fi
fi
case "$CGROUP_DRIVER" in systemd|cgroupfs) ;; *) die "--cgroup-driver must be systemd or cgroupfs" ;; esac

# 1. Runtimes and tools from the distribution.
if [ $PACKAGES -eq 1 ]; then
    say "installing runtime packages"
    bash "$SRC/deploy/deps.sh" --runtime
fi

# 2. shimd in its own virtualenv (never in the system Python).
say "installing shimd into $PREFIX/venv"
python=$(bash "$SRC/deploy/python.sh") || die "shimd needs Python >= 3.11 with venv"
[ -x "$PREFIX/venv/bin/python" ] || "$python" -m venv "$PREFIX/venv"
pip_args=(-q --disable-pip-version-check)
[ -n "$WHEELS" ] && pip_args+=(--no-index --find-links "$WHEELS")
"$PREFIX/venv/bin/python" -m pip install "${pip_args[@]}" --upgrade "$SRC"
ln -sf "$PREFIX/venv/bin/shimd" /usr/local/bin/shimd
# The compiled per-pod shim for runc handlers (shimd finds it in PATH); without cargo they use the Python one.
cargo=$(command -v cargo || echo "${HOME:-/root}/.cargo/bin/cargo")
if [ -x "$cargo" ]; then
    say "building the compiled shim (shims/native)"
    CARGO_TARGET_DIR="$PREFIX/build" "$cargo" build -q --release --locked --manifest-path "$SRC/shims/native/Cargo.toml"
    install -m 0755 "$PREFIX/build/release/shimd-runc-shim" /usr/local/bin/shimd-runc-shim
else
    say "cargo not found: runc pods will run under the Python shim (install Rust, then run this again)"
fi
install -d -m 0755 /usr/local/share/doc/shimd
install -m 0644 "$SRC/README.md" "$SRC"/docs/*.md /usr/local/share/doc/shimd/ 2>/dev/null || true

# 3. Configuration: written once, then the operator's.
install -d -m 0755 "$ETC"
if [ ! -e "$ETC/config.toml" ]; then
    say "writing $ETC/config.toml (cgroup_driver = $CGROUP_DRIVER)"
    shimd config default | sed -E "s/^cgroup_driver = \"[a-z]+\"( +)/cgroup_driver = \"$CGROUP_DRIVER\"\1/" \
        > "$ETC/config.toml.new"
    shimd config check "$ETC/config.toml.new" >/dev/null
    mv "$ETC/config.toml.new" "$ETC/config.toml"
else
    say "keeping existing $ETC/config.toml"
    shimd config check "$ETC/config.toml" || die "existing $ETC/config.toml is invalid; fix it first"
fi
[ -e /etc/crictl.yaml ] || install -m 0644 "$SRC/deploy/crictl.yaml" /etc/crictl.yaml

# 4. A pod network, only where the node has none (a cluster's CNI DaemonSet usually brings its own).
if [ $CNI -eq 1 ] && [ -z "$(ls -A "$CNI_DIR" 2>/dev/null)" ]; then
    say "no CNI config in $CNI_DIR: installing shimd's default bridge network"
    install -d -m 0755 "$CNI_DIR"
    shimd config cni-default > "$CNI_DIR/10-shimd.conflist"
fi

# 5. The service.
install -m 0644 "$SRC/deploy/shimd.service" /etc/systemd/system/shimd.service
printf 'overlay\nbr_netfilter\n' > /etc/modules-load.d/shimd.conf
if [ $systemd_init -eq 1 ]; then
    systemctl daemon-reload
    if [ $ENABLE -eq 1 ]; then
        # A restart keeps running containers: the unit has KillMode=process and shims outlive shimd.
        systemctl enable shimd.service >/dev/null
        if systemctl is-active -q shimd.service; then systemctl restart shimd.service; else systemctl start shimd.service; fi
        say "shimd.service enabled and running"
    fi
else
    say "systemd is not the init system: start shimd with '/usr/local/bin/shimd serve' from your supervisor"
fi

# 6. Verify the node.
say "shimd check:"
if shimd check; then
    say "done"
elif [ $STRICT -eq 1 ]; then
    die "shimd check found problems (above)"
else
    say "done, but shimd check found problems (above)"
fi
