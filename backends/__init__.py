"""Backends: the model-family contract, the registry, hub downloads, one module per family."""
