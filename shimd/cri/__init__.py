"""CRI v1 gRPC servers: validation and translation only; the work happens in the layers below."""
