"""File readers and writers: GGUF, safetensors, and the checks every reader shares (common.py).
Each returns what the file holds; mapping it onto a model is the loaders' job."""
