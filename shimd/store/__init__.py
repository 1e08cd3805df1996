"""Pod and container metadata: in memory for reads, written through to disk before an RPC returns."""
