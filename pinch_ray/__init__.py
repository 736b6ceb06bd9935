"""pinch_ray: one-pass compression of speech foundation models with self-pinching gates, on Ray."""

__version__ = "0.1.0"
