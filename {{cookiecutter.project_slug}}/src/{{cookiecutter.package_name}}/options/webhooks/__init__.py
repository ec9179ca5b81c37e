"""Partners' signed webhooks (Standard Webhooks): verified in layer 4, received by an example
route, and signed for sending (`outbound.py`). The wiring and settings are `extension.py`."""
