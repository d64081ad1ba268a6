"""The engine: the generation loop (generation.py), sampling (sampling.py) and stop strings
(stops.py), on top of the model's forward pass."""
