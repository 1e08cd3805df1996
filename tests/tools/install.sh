#!/usr/bin/env bash
# Builds the Go programs the conformance tests drive (cri-tools' critest and crictl, kubelet) from their
# modules at pinned versions into .tools/bin, which git ignores. Each is rebuilt only when its pin changes.
# Without Go nothing is built and the tests that need these programs are skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="$PWD/.tools/bin"
CRI_TOOLS=sigs.k8s.io/cri-tools@v1.37.0
KUBELET_MOD="$PWD/tests/tools/kubelet"

if ! command -v go >/dev/null 2>&1; then
    echo "tools: Go is not installed: critest, crictl and kubelet tests will be skipped" >&2
    exit 0
fi
mkdir -p "$BIN"

# up_to_date NAME PIN: the binary exists and was built from PIN.
up_to_date() { [ -x "$BIN/$1" ] && [ "$(cat "$BIN/.$1.pin" 2>/dev/null)" = "$2" ]; }
built() { echo "$2" > "$BIN/.$1.pin"; echo "tools: built $1 ($2)"; }

if ! up_to_date crictl "$CRI_TOOLS" || ! up_to_date critest "$CRI_TOOLS"; then
    GOBIN="$BIN" go install "sigs.k8s.io/cri-tools/cmd/crictl@${CRI_TOOLS#*@}"
    built crictl "$CRI_TOOLS"
    # critest is a Ginkgo test binary: cri-tools builds it with `go test -c` inside its own module.
    src=$(go mod download -json "$CRI_TOOLS" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    (cd "$src" && go test -c -o "$BIN/critest" ./cmd/critest)
    built critest "$CRI_TOOLS"
fi

kubelet_pin=$(cat "$KUBELET_MOD/go.mod" "$KUBELET_MOD/go.sum" | sha256sum | cut -c1-16)  # contents only, not where the clone is
if ! up_to_date kubelet "$kubelet_pin"; then
    (cd "$KUBELET_MOD" && go build -o "$BIN/kubelet" k8s.io/kubernetes/cmd/kubelet)
    built kubelet "$kubelet_pin"
fi
