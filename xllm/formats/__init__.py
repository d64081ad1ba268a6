"""Weight formats: the registry (registry.py: one row per format), quantized tensors and the
quantizers (qtensor.py), and the choice of kernel for a weight (dispatch.py)."""
