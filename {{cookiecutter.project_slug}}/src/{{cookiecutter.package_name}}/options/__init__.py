"""The credential options baked into this service, one package each; `extensions.py` finds them."""
