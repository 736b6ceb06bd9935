"""pinch_ray: one-pass compression of speech foundation models with self-pinching gates, on Ray.

In your own training code (docs/api.md)::

    import pinch_ray

    pinch = pinch_ray.attach(model, "sspg", target_sparsity=0.65, max_steps=2000)
    ...  # loss + pinch.sparsity_loss(); pinch.step() after each optimizer step
    pinch.save_pretrained("out/pruned", processor)

``attach``, ``Pinch`` and ``GateConfig`` are imported on first use (``import pinch_ray`` stays
light); a ``transformers.Trainer`` script uses :mod:`pinch_ray.hf`; the pipeline, ``pinch-ray run``.
"""

__version__ = "0.1.0"

__all__ = ["GateConfig", "Pinch", "attach", "__version__"]


def __getattr__(name: str):
    if name in ("attach", "Pinch"):
        from pinch_ray.core import pinch

        return getattr(pinch, name)
    if name == "GateConfig":
        from pinch_ray.config import GateConfig

        return GateConfig
    raise AttributeError(f"module 'pinch_ray' has no attribute {name!r}")
