"""Layers 3 to 5 share one round trip to the store per request.

The address limit (layer 3), the revocation lookup of authentication (layer 4) and the subject limit
(layer 5) each need an answer from Redis; asked one after the other, that is three round trips on
every request. Here they are asked together:

- A token this process has verified before (the verified-token cache, no cryptography) is known to
  layer 3 already. Layer 3 then sends the address window and the subject's check in one write.
- Any other request gets the address window alone (a cheap refusal before any signature is
  checked); once the token verifies, layer 4 sends the subject's check.
- Either way the address window also reads the address's lockout (lockout.py), in the same script.

The subject's check is one script over keys of one hash slot (the subject's hash tag): is the token
revoked (its `jti`, or the subject's "revoked before" mark), and if not, count it in the subject's
window, so a revoked token never spends its subject's limit. The address window is a separate
command on its own key. Both are Redis Cluster-safe by construction.

A DPoP proof (dpop.py) is spent in the same script: its key is written with SET NX for as long as
a proof is fresh, and a proof whose key is there already is a replay, on whichever replica it was
first accepted. Layer 3 spends the proof of a token it knows (before the proof is checked: a proof
that then fails has spent only its own jti); otherwise layer 4 does, after checking it.

Each layer still decides alone and in the pipeline's order (the address limit's 429, then the
token's 401, then the subject limit's 429); the answers only travel together.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

from ..config import Settings
from ..store.core import MemoryStore, Script, StoreUnavailable
from .binding import PROOF_STATE
from .dpop import InvalidProof
from .events import security_event
from .limiter import Decision, Policy, RateLimiter, count_in_window, decision
from .lockout import LockedOut, Lockout
from .principal import InvalidCredentials, Principal
from .revocation import Revocations, RevocationStoreUnavailable, tag

STATE_KEY = "admission"
WARNING_INTERVAL_SECONDS = 60.0

# KEYS: the address's window, its lock. ARGV: window ms. Returns {count, ttl, lock ms left}.
ADDRESS_CHECK = Script(count_in_window("KEYS[1]", "ARGV[1]") + "return {count, ttl, redis.call('PTTL', KEYS[2])}\n")

# KEYS: the subject's revocation mark, its window, its lock, the token's jti entry (if any), the DPoP
# proof's key (if any, then last). ARGV: iat minus the leeway, window ms, the proof's ttl ms (only
# with a proof). Returns {-2, lock ms left}, {-1, the mark} (revoked before the mark), {-3, 0} (its
# jti revoked), {-4, 0} (the proof was spent before) or {count, ttl}; what refuses is remembered
# for open mode.
SUBJECT_CHECK = Script(
    """
local denied = KEYS[4]
local proof = nil
if ARGV[3] then
  proof = KEYS[#KEYS]
  if #KEYS == 4 then
    denied = nil
  end
end
local locked = redis.call('PTTL', KEYS[3])
if locked > 0 then
  return {-2, locked}
end
local mark = redis.call('GET', KEYS[1])
if mark and tonumber(ARGV[1]) < tonumber(mark) then
  return {-1, mark}
end
if denied and redis.call('EXISTS', denied) == 1 then
  return {-3, 0}
end
if proof and not redis.call('SET', proof, '1', 'NX', 'PX', ARGV[3]) then
  return {-4, 0}
end
"""
    + count_in_window("KEYS[2]", "ARGV[2]")
    + "return {count, ttl}\n"
)


@dataclass(frozen=True, slots=True)
class SubjectAnswer:
    """What the store said about one authenticated principal."""

    principal: Principal
    revoked: bool
    decision: Decision | None  # the subject window; None when revoked or locked, or the store is down in `open` mode
    locked_seconds: int = 0  # the subject is locked out (lockout.py) for this long
    proof: str | None = None  # the DPoP proof's key this answer spent (or found spent)
    replayed: bool = False  # that proof had been spent before


class SpentProofs:
    """DPoP proofs spent in this process: the store's SET NX without Redis (development), and while
    Redis is down in `open` mode (each replica then refuses only the replays it sees). Bounded."""

    SIZE = 100_000

    def __init__(self) -> None:
        self._spent: OrderedDict[str, float] = OrderedDict()

    def spend(self, key: str, ttl_ms: int) -> bool:
        """True the first time `key` is spent within its ttl; False for a replay."""
        now = time.monotonic()
        expires = self._spent.get(key)
        if expires is not None and expires > now:
            return False
        self._spent[key] = now + ttl_ms / 1000
        self._spent.move_to_end(key)
        while len(self._spent) > self.SIZE or (self._spent and next(iter(self._spent.values())) <= now):
            self._spent.popitem(last=False)
        return True


class Admission:
    """The store's answers for layers 3-5 of one request, asked in as few round trips as possible."""

    def __init__(self, settings: Settings, limiter: RateLimiter, revocations: Revocations, lockout: Lockout) -> None:
        self.lockout = lockout
        self.address_policy = Policy.of("ip", settings.ip_limit)
        self.subject_policy = Policy.of("subject", settings.subject_limit)
        self.limiter = limiter
        self.revocations = revocations
        self.store = limiter.store
        self.leeway = settings.jwt_leeway_seconds
        # A proof is spent for as long as its `iat` may be accepted (dpop.ProofVerifier.window_ms).
        self.proof_ttl_ms = (settings.dpop_proof_max_age_seconds + 2 * self.leeway) * 1000
        self.spent_proofs = SpentProofs()
        self._warned_at = -math.inf

    # --- layer 3 ------------------------------------------------------------------------------

    async def address(self, scope: Scope, key: str, known: Principal | None) -> Decision | None:
        """Count the request against the address limit and read the address's lockout; with
        `known`, ask the subject's check in the same round trip and keep its answer for layers 4
        and 5. None: store down, mode open. Raises LockedOut for a locked address."""
        self.lockout.raise_if_locked(key)
        refused = self.limiter.blocked(self.address_policy, key)
        if refused is not None:
            return refused
        # A DPoP-bound token's proof, named by DPoPToken.known: spent in this round trip.
        proof = scope.get("state", {}).get(PROOF_STATE) if known is not None and known.binding is not None else None
        if isinstance(self.store, MemoryStore):
            address = await self.limiter.hit(self.address_policy, key)
            if known is not None:
                self._keep(scope, self._memory_subject(known, proof))
            return address
        commands = [self._address_check(key)]
        if known is not None:
            commands.append(self._subject_check(known, proof))
        try:
            replies = await self.store.run(commands)
        except StoreUnavailable as exc:
            self.limiter.unavailable(exc)  # raises in `closed` mode: layer 3 answers 503
            if known is not None:
                self._keep(scope, self._unavailable(known, exc, proof))
            return None
        count, ttl_ms, locked_ms = replies[0]
        self.lockout.raise_if_locked(key, locked_ms)
        if known is not None:
            self._keep(scope, self._subject_answer(known, replies[1], proof))
        return self.limiter.note(decision(self.address_policy, (count, ttl_ms)), key)

    # --- layers 4 and 5 -----------------------------------------------------------------------

    async def subject(self, scope: Scope, principal: Principal, proof: str | None = None) -> SubjectAnswer:
        """Layer 4: the answer layer 3 asked for this principal (and proof), else one round trip now.
        Raises RevocationStoreUnavailable when the store is down and the mode is `closed`."""
        kept: SubjectAnswer | None = scope.get("state", {}).get(STATE_KEY)
        if kept is not None and kept.principal is principal and kept.proof == proof:
            return kept
        if isinstance(self.store, MemoryStore):
            return self._keep(scope, self._memory_subject(principal, proof))
        try:
            (reply,) = await self.store.run([self._subject_check(principal, proof)])
        except StoreUnavailable as exc:
            return self._keep(scope, self._unavailable(principal, exc, proof))
        return self._keep(scope, self._subject_answer(principal, reply, proof))

    async def admit(self, scope: Scope, principal: Principal, *, proof: str | None = None) -> Principal:
        """Layer 4, once a credential has verified: the principal, unless its subject is locked out
        (LockedOut, 429) or revoked (InvalidCredentials, 401), or its DPoP proof (`proof`: the key
        that spends it) was spent before (InvalidProof, 401). Every credential type ends here."""
        answer = await self.subject(scope, principal, proof)
        if answer.locked_seconds:
            raise LockedOut(answer.locked_seconds)
        if answer.revoked:
            raise InvalidCredentials("revoked", subject=principal.subject)
        if answer.replayed:
            raise InvalidProof("proof_replayed")
        return principal

    @staticmethod
    def kept(scope: Scope) -> SubjectAnswer | None:
        """Layer 5: the answer layer 4 acted on."""
        answer: SubjectAnswer | None = scope.get("state", {}).get(STATE_KEY)
        return answer

    # --- helpers ------------------------------------------------------------------------------

    def _address_check(self, address: str) -> Any:
        """Count the request in the address's window and read the address's lock, in one script:
        both keys carry the address as their hash tag."""
        keys = [self.address_policy.key_prefix + tag(address), self.lockout.lock_key(address)]
        return ADDRESS_CHECK.call(keys, [self.address_policy.window * 1000])

    def _subject_check(self, principal: Principal, proof: str | None = None) -> Any:
        mark, denied = self.revocations.keys(principal)
        keys = [
            mark,
            self.subject_policy.key_prefix + tag(principal.subject),
            self.lockout.subject_lock_key(principal.subject),
        ]
        if denied is not None:
            keys.append(denied)
        arguments = [principal.issued_at - self.leeway, self.subject_policy.window * 1000]
        if proof is not None:
            keys.append(proof)
            arguments.append(self.proof_ttl_ms)
        return SUBJECT_CHECK.call(keys, arguments)

    def _subject_answer(self, principal: Principal, reply: Any, proof: str | None = None) -> SubjectAnswer:
        """The store's answer; a refusal is also remembered, for open mode during an outage."""
        code = int(reply[0])
        if code == -2:
            self.lockout.note_subject(principal.subject, int(reply[1]))
            return SubjectAnswer(principal, False, None, math.ceil(int(reply[1]) / 1000))
        if code == -1:
            self.revocations.seen.mark(principal.subject, float(reply[1]))
            return SubjectAnswer(principal, True, None)
        if code == -3:
            assert principal.token_id is not None
            self.revocations.seen.token(principal.subject, principal.token_id, principal.expires_at + self.leeway)
            return SubjectAnswer(principal, True, None)
        if code == -4:
            return SubjectAnswer(principal, False, None, proof=proof, replayed=True)
        return SubjectAnswer(principal, False, decision(self.subject_policy, reply), proof=proof)

    def _memory_subject(self, principal: Principal, proof: str | None = None) -> SubjectAnswer:
        assert isinstance(self.store, MemoryStore)
        locked = self.lockout.subject_locked_seconds(principal.subject)
        if locked > 0:
            return SubjectAnswer(principal, False, None, locked)
        if self.revocations.memory_revoked(principal):
            return SubjectAnswer(principal, True, None)
        if proof is not None and not self.spent_proofs.spend(proof, self.proof_ttl_ms):
            return SubjectAnswer(principal, False, None, proof=proof, replayed=True)
        key = self.subject_policy.key_prefix + tag(principal.subject)
        count, ttl_ms = self.store.count(key, self.subject_policy.window * 1000)
        return SubjectAnswer(principal, False, decision(self.subject_policy, (count, ttl_ms)), proof=proof)

    def _unavailable(self, principal: Principal, exc: Exception, proof: str | None = None) -> SubjectAnswer:
        """Store down: `closed` refuses (503 from layer 4); `open` judges the principal by what this
        process has seen (a subject locked, a token or key revoked: still refused) and serves the
        rest, logged."""
        if not self.limiter.fail_open:
            raise RevocationStoreUnavailable from exc
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_SECONDS:
            self._warned_at = now
            security_event("revocation_store_unavailable", failure_mode="open")
        locked = self.lockout.subject_remembered_seconds(principal.subject)
        if locked:
            return SubjectAnswer(principal, False, None, locked)
        replayed = proof is not None and not self.spent_proofs.spend(proof, self.proof_ttl_ms)
        return SubjectAnswer(principal, self.revocations.seen.revoked(principal), None, proof=proof, replayed=replayed)

    @staticmethod
    def _keep(scope: Scope, answer: SubjectAnswer) -> SubjectAnswer:
        scope.setdefault("state", {})[STATE_KEY] = answer
        return answer
