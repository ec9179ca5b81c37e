"""mTLS workload identity for internal callers: client certificates, terminated by `serve` or at a
trusted proxy. The wiring and settings are `extension.py`, the layer-4 check `authenticator.py`."""
