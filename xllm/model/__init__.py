"""The model: its weights (weights.py), the forward pass (transformer.py), the KV cache, the
batching of concurrent steps (batcher.py) and the thread governor."""
