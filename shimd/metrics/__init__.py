"""shimd's own Prometheus metrics (RPCs, objects, pulls, shims), served over HTTP with aiohttp."""
