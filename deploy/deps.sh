#!/usr/bin/env bash
# Installs the Debian packages shimd and its tests need, only when something is missing.
# bookworm-backports (for runsc) is derived from the machine's own Debian sources entry, so no
# archive host name lives in this repository.
set -euo pipefail

# Tests only: gcc and libc6-dev build the small static programs in the conformance images, whose busybox
# stand-in also carries util-linux's ipcs and procps' pgrep.
PKGS=(runc crun runsc containernetworking-plugins catatonit busybox-static docker-registry containerd
      iproute2 iptables util-linux e2fsprogs protobuf-compiler criu gcc libc6-dev procps python3 python3-venv)
# `deps.sh --runtime`: only what a production node needs to run shimd (deploy/install.sh uses it).
if [ "${1:-}" = "--runtime" ]; then
    PKGS=(runc runsc containernetworking-plugins catatonit iproute2 iptables util-linux python3 python3-venv criu)
fi

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
fi

backports=/etc/apt/sources.list.d/shimd-backports.sources
if [ ! -e "$backports" ]; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME}")
    src=/etc/apt/sources.list.d/debian.sources
    if [ -f "$src" ]; then
        # Take the first deb822 stanza (the main archive) and point it at <codename>-backports.
        awk -v cn="$codename" 'BEGIN{RS="";ORS="\n\n"} NR==1{gsub(/Suites:[^\n]*/,"Suites: " cn "-backports"); print}' \
            "$src" > "$backports"
    elif [ -f /etc/apt/sources.list ]; then
        line=$(grep -E "^deb [^ ]+ +${codename} " /etc/apt/sources.list | head -n1)
        echo "$line" | sed -E "s/ ${codename} / ${codename}-backports /" > /etc/apt/sources.list.d/shimd-backports.list
        backports=/etc/apt/sources.list.d/shimd-backports.list
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
