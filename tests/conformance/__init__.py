"""Conformance: the real Go clients (critest, crictl, kubelet) against a shimd of their own."""
