"""DPoP across a fleet: two replicas (real `serve` processes) sharing one redis-server, behind the
shipped nginx (deploy/nginx/nginx.conf), TRUSTED_PROXIES set to the proxy. Proofs are made by
joserfc (tests/test_dpop.py).

- A proof is accepted once by the whole fleet: replayed to the other replica, it is refused.
- `htu` is the URL the client used: through nginx that is nginx's host and port (X-Forwarded-Host),
  not the replica's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from joserfc.jwk import ECKey
from redis import Redis

from .conftest import AUDIENCE, ISSUER, TokenFactory
from .servers import LOOPBACK, NginxProxy, ServiceProcess, replicas_behind_nginx
from .test_dpop import ORG, PROTECTED, assert_proof_refused, dpop, proof
from .test_replicas import NGINX_CONF

pytestmark = pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")
CLIENT = "127.0.0.2"


@dataclass
class Fleet:
    replicas: list[ServiceProcess]
    proxy: NginxProxy

    def client(self, base_url: str, host: str = "localhost") -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(local_address=CLIENT)
        return httpx.AsyncClient(transport=transport, base_url=base_url, headers={"Host": host}, timeout=15)


@pytest.fixture(scope="module")
def fleet(
    migrated_database: str, redis_url: str, public_pem: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("dpop-fleet")
    fleet_redis = redis_url.rsplit("/", 1)[0] + "/6"  # a database of its own
    with Redis.from_url(fleet_redis) as redis:
        redis.flushdb()
    env = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": migrated_database,
        "REDIS_URL": fleet_redis,
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "TRUSTED_PROXIES": LOOPBACK,
        "TRUSTED_HOSTS": "localhost",
        "RATE_LIMIT_IP": "100000/minute",
        "RATE_LIMIT_SUBJECT": "100000/minute",
        "LOCKOUT_FAILURES": "10000",
    }
    with replicas_behind_nginx(env, directory, 2, NGINX_CONF) as (replicas, proxy):
        yield Fleet(replicas, proxy)


async def test_a_proof_accepted_by_one_replica_is_refused_by_the_other(fleet: Fleet, make_token: TokenFactory) -> None:
    key = ECKey.generate_key("P-256")
    token = make_token(cnf={"jkt": key.thumbprint()})
    first, second = (fleet.client(f"http://{LOOPBACK}:{replica.port}") for replica in fleet.replicas)
    async with first, second:
        spent = dpop(token, proof(key, token))  # the URL is http://localhost/... on either replica
        assert (await first.post(PROTECTED, json=ORG, headers=spent)).status_code == 201
        assert_proof_refused(await second.post(PROTECTED, json=ORG, headers=spent))
        # Once the second replica knows the token, its layer 3 spends the proof: still refused there.
        assert (await second.post(PROTECTED, json=ORG, headers=dpop(token, proof(key, token)))).status_code == 201
        assert_proof_refused(await second.post(PROTECTED, json=ORG, headers=spent))
        assert_proof_refused(await first.post(PROTECTED, json=ORG, headers=spent))


async def test_htu_through_nginx_is_the_url_the_client_used(fleet: Fleet, make_token: TokenFactory) -> None:
    key = ECKey.generate_key("P-256")
    token = make_token(cnf={"jkt": key.thumbprint()})
    public = f"localhost:{fleet.proxy.port}"
    async with fleet.client(fleet.proxy.url, host=public) as client:
        for _ in fleet.replicas:  # nginx balances round robin: each replica judges one
            used = proof(key, token, htu=f"http://{public}{PROTECTED}")
            assert (await client.post(PROTECTED, json=ORG, headers=dpop(token, used))).status_code == 201
        # What a replica sees (nginx's Host is without the port) is not the URL the client used.
        internal = proof(key, token, htu=f"http://localhost{PROTECTED}")
        assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(token, internal)))
        # A client's own X-Forwarded-Host is replaced by nginx.
        forged = proof(key, token, htu=f"http://evil.example{PROTECTED}")
        headers = {**dpop(token, forged), "X-Forwarded-Host": "evil.example"}
        assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=headers))
