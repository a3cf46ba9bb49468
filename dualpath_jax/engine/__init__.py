"""Engines: continuous batching over a paged KV cache on one device group."""
