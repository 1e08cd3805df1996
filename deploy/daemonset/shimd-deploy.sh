#!/usr/bin/env bash
# Entry point of the shimd-deploy DaemonSet pod (privileged, hostPID, host / mounted at /host).
#   install: copy the source to the host, run deploy/install.sh in the host's root, label the node,
#            then sleep (a DaemonSet pod must keep running; deleting it does not uninstall).
#   cleanup: remove the node label (the preStop hook runs this).
# The node is labelled shimd.io/runtime=installed on success and =failed otherwise, so workloads and
# RuntimeClass scheduling can select nodes where shimd is ready.
set -euo pipefail

HOST=${HOST_ROOT:-/host}
NODE=${NODE_NAME:?NODE_NAME must come from the downward API (spec.nodeName)}
LABEL=${SHIMD_NODE_LABEL:-shimd.io/runtime}
INSTALL_ARGS=${SHIMD_INSTALL_ARGS:-}
SA=/var/run/secrets/kubernetes.io/serviceaccount

label() {  # label VALUE ("" removes it); a merge patch through the API server, no kubectl needed
    local value=$1 body
    if [ -n "$value" ]; then body="{\"metadata\":{\"labels\":{\"$LABEL\":\"$value\"}}}"
    else body="{\"metadata\":{\"labels\":{\"$LABEL\":null}}}"; fi
    curl -fsS --max-time 30 --cacert "$SA/ca.crt" -H "Authorization: Bearer $(cat "$SA/token")" \
        -H "Content-Type: application/merge-patch+json" -X PATCH --data "$body" \
        "https://${KUBERNETES_SERVICE_HOST}:${KUBERNETES_SERVICE_PORT}/api/v1/nodes/${NODE}" >/dev/null
}

case "${1:-install}" in
    install)
        echo "shimd-deploy: installing on node $NODE"
        rm -rf "$HOST/opt/shimd-src.new"
        cp -a /opt/shimd-src "$HOST/opt/shimd-src.new"
        rm -rf "$HOST/opt/shimd-src"
        mv "$HOST/opt/shimd-src.new" "$HOST/opt/shimd-src"
        # The host's own package manager, Python and systemd do the work, as if run on the node.
        # shellcheck disable=SC2086
        if chroot "$HOST" /bin/bash /opt/shimd-src/deploy/install.sh --strict $INSTALL_ARGS; then
            label installed
            echo "shimd-deploy: node $NODE labelled $LABEL=installed"
        else
            label failed || true
            echo "shimd-deploy: installation failed on $NODE" >&2
            exit 1
        fi
        # Stay up so the DaemonSet shows the node as done; the installation lives on the host.
        exec sleep infinity
        ;;
    cleanup)
        label "" || true
        ;;
    *)
        echo "usage: shimd-deploy.sh install|cleanup" >&2
        exit 2
        ;;
esac
