#!/usr/bin/env bash
# A CRIU the checkpoint tests can use when the node's own fails `criu check`, in .tools/criu (git-ignored).
#
# Debian 12's criu 3.17 stops at "vdso: Unexpected rt vDSO area bounds" on kernels that map the vDSO's
# clock pages as a separate [vvar_vclock] area (this project's machines run 6.18); criu 4.1.1 handles
# it. Debian's next release ships 4.1.1, built against its own libc, so its packages are fetched with
# apt (a private configuration; the archive is the one the machine's own sources name), unpacked here
# without being installed, and run through their own dynamic loader. Tests only: a node installs criu
# with deploy/deps.sh. Nothing is fetched when the system criu works; without either, the checkpoint
# round trip is skipped with criu's error.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR="$PWD/.tools/criu"
SUITE=trixie
PKGS=(criu libcompel1 libc6 libgcc-s1 libgnutls30t64 libbsd0 libmd0 libnet1 libnftables1 libnl-3-200
      libprotobuf-c1 libuuid1 libp11-kit0 libidn2-0 libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64
      libgmp10 libmnl0 libnftnl11 libxtables12 libjansson4 libffi8 libedit2 libtinfo6)

if command -v criu >/dev/null 2>&1 && criu check >/dev/null 2>&1; then
    exit 0
fi
if [ -x "$DIR/bin/criu" ] && "$DIR/bin/criu" check >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tools: the system criu does not work and no other can be fetched here: checkpoint round trip skipped" >&2
    exit 0
fi

uri=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
elif [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $2 ~ /^http/ {print $2; exit}' /etc/apt/sources.list)
fi
if [ -z "$uri" ]; then
    echo "tools: no Debian archive in the apt sources: checkpoint round trip skipped" >&2
    exit 0
fi

rm -rf "$DIR"
mkdir -p "$DIR/apt/lists/partial" "$DIR/apt/cache/archives/partial" "$DIR/debs" "$DIR/root" "$DIR/bin"
echo "deb $uri $SUITE main" > "$DIR/apt/sources.list"
: > "$DIR/apt/status"
apt_opts=(-o "Dir::Etc::SourceList=$DIR/apt/sources.list" -o "Dir::Etc::SourceParts=$DIR/apt/none"
          -o "Dir::State::Lists=$DIR/apt/lists" -o "Dir::Cache=$DIR/apt/cache" -o "Dir::State::status=$DIR/apt/status"
          -o "APT::Sandbox::User=root")
if ! apt-get "${apt_opts[@]}" -qq update || ! (cd "$DIR/debs" && apt-get "${apt_opts[@]}" -qq download "${PKGS[@]}"); then
    echo "tools: fetching criu from Debian $SUITE failed: checkpoint round trip skipped" >&2
    rm -rf "$DIR"
    exit 0
fi
for deb in "$DIR"/debs/*.deb; do
    dpkg-deb -x "$deb" "$DIR/root"
done
lib="$DIR/root/usr/lib/x86_64-linux-gnu"
cat > "$DIR/bin/criu" <<EOF
#!/bin/sh
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$DIR/root/usr/sbin/criu" "\$@"
EOF
chmod +x "$DIR/bin/criu"
rm -rf "$DIR/apt" "$DIR/debs"
if out=$("$DIR/bin/criu" check 2>&1); then
    echo "tools: criu $("$DIR/bin/criu" --version | awk '/Version/{print $2}') from Debian $SUITE in $DIR/bin"
else
    echo "tools: criu from Debian $SUITE fails too: $(echo "$out" | grep Error | tail -n1)" >&2
    rm -rf "$DIR"
fi
