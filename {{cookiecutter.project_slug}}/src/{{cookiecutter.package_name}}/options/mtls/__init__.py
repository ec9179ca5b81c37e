"""mTLS workload identity for internal callers: client certificates, terminated by `serve` or at a
forwarding proxy (one address, or its own certificate). The wiring and settings are
`extension.py`, the layer-4 check `authenticator.py`."""
