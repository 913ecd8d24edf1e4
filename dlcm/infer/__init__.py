"""Inference: KV caches, incremental decoding steps, CUDA-graph replay, generation and ``dlcm generate``."""
