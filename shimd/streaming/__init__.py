"""Streaming server for CRI Exec/Attach/PortForward: SPDY/3.1 and WebSocket, as kubelet and crictl speak them."""
