"""How the credentials of one request combine into one principal (layer 4): the composition model
of the README's Decision matrix, in one place.

Two kinds of credential, as each option's Extension declares them (extensions.py):

- a channel credential (`ChannelAuthenticator`, the `mtls` option's client certificate) names the
  calling workload. When configured, every authenticated request needs one, webhooks included;
- caller credentials (`Authenticator`: a bearer token, an API key, a webhook signature on its own
  route) name the caller. At most one per request: two are refused, never ranked.

The rules, applied in this order by `Authenticate`:

1. Every credential presented is verified, and any that fails is a 401 with its own challenge,
   whatever else verified: a bad API key is never passed over for a good certificate or token.
   Every `Authorization` header is a credential presented: several of them, an empty one, a
   malformed one (a scheme that is not an RFC 9110 token followed by one or more spaces, e.g.
   `Bearer<TAB>x`) and a scheme the service does not accept (`Basic`, `Digest`) are refused (401
   with the challenges of the schemes it accepts), never ignored. Each refusal counts towards
   the address's lockout; a request with no credential at all does not.
2. Several caller credentials: 401 (`several_credentials`).
3. A workload and a caller: the principal is the caller (its subject, revocation, lockout and
   limits), and its scopes are those both it and the workload hold. A webhook signature is the
   exception: it keeps its one scope, `webhooks:receive` (the workload's scopes are the API's).
4. A workload alone: the principal is the workload, unless its channel requires a caller
   (`mtls+jwt`): 401 (`token_required`).
5. A caller alone (no channel configured): the caller.
"""

from __future__ import annotations

from dataclasses import replace

from .principal import Principal


def compose(workload: Principal | None, caller: Principal, *, signs_body: bool) -> Principal:
    """Rules 3 and 5: the principal of a request whose caller credential verified."""
    if workload is None or signs_body:
        return caller
    return replace(caller, scopes=caller.scopes & workload.scopes)
