"""The security pipeline. `pipeline.py` shows its order; each layer is one module here."""
