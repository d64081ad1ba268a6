"""Argument checks shared by the public API: counts and real numbers, with clear errors."""
import math
import numbers


def check_count(name, value, minimum=0):
    """`value` as an int if it is an integer (Python or NumPy, not bool) >= minimum; TypeError
    for other types (floats included: 2.5 tokens mean nothing), ValueError below minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name, value):
    """`value` as a float if it is a finite real number (not bool); TypeError or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
