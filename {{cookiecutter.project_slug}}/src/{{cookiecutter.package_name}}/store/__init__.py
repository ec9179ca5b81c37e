"""The Redis client behind rate limits, revocation and lockout: one round trip per request.

`core` is the contract (`RemoteStore`, its errors, the round trip's deadline) with the single-node
client and the in-process fallback; `sentinel` and `cluster` are the other topologies REDIS_URL
can name (`topology`).
"""
