"""Scoped API keys for partner (B2B) callers: settings, the table and the operations on it, the
layer-4 authenticator (`authenticator.py`), the owner-only API (`routes.py`), the operators'
commands (`cli.py`) and the wiring (`extension.py`)."""
