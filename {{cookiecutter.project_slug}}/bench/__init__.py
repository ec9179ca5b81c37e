"""`make bench`: what the security pipeline costs per request, measured against the bare framework.

Bench-only code: the service never imports it. `python -m bench --help` for the options.
"""
