"""Scoped API keys for partner (B2B) callers: settings, the table and the operations on it.

The authenticator (layer 4) is `security/api_keys.py`, the owner-only API `api/api_keys.py`, the
operators' commands and the wiring `options/api_keys.py`.
"""
