"""Rotary position embedding tables."""
import numpy as np


def rope_tables(inv_freq, n_positions):
    """cos and sin tables [n_positions, head_dim/2], computed in float32 as transformers does."""
    angles = np.arange(n_positions, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
