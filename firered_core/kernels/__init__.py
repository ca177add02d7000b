"""Kernel choices for the transformer's hot paths: the joint attention backend, fast GGUF decoding."""
