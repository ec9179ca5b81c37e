"""The `cerbos` authorization engine (authz_engine=cerbos): layer 7's decisions asked of a Cerbos
policy decision point (PDP) over gRPC, with the service's policies as code in `policies/`.

The route declarations (`require_relation`, `read_with_relation`, `no_object_policy`,
`list_with_relation`, security/authz.py) keep their words; the permissions table still records who
holds which relation, read in the same statement as before, and the PDP decides with it (pdp.py).
Lists ask for a query plan and write it as SQL (plan.py). PDP down or slow: 503, never an allow.

Settings (environment variables, validated at start; production refuses unsafe ones by name):

- CERBOS_ADDRESS: the PDP's gRPC `host:port` (default 127.0.0.1:3593, a sidecar on loopback).
- CERBOS_TIMEOUT_SECONDS: how long one decision may take before the request is answered 503.
- CERBOS_TLS_CA_FILE: a file, the CA bundle the PDP's TLS certificate is checked against; set, the
  service speaks TLS to the PDP.
- CERBOS_ALLOW_PLAINTEXT: production refuses a PDP on another host over plaintext gRPC (anyone
  on the path could answer "allow") unless this is `true`: the network alone protects it.
"""
