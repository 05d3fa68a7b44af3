"""Callbacks that sparsify a model inside the training loops people already have.

    from fxsparse.integrations.lightning import SparsifyCallback      # pip install "fxsparse[lightning]"
    from fxsparse.integrations.transformers import SparsifyCallback   # pip install "fxsparse[transformers]"

Each submodule imports its framework; this package imports neither. Usage: docs/INTEGRATIONS.md.
"""
