"""File readers and writers, side by side: GGUF (gguf.py), safetensors (safetensors.py), xllm's
own quantized directory (xllm_format.py), and the checks every reader shares (common.py).
Each returns what the file holds; mapping it onto a model is the loaders' job."""
