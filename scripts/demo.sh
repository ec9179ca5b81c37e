#!/usr/bin/env bash
# Bake the default service into build/secure-api, install it, migrate its SQLite
# database, make a development key pair and token, then run it on 127.0.0.1:8000.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(cd "$root" && cd "${VENV:-.venv}" && pwd)
project="$root/build/secure-api"
scopes="orgs:read orgs:write users:read users:write"
export PATH="$venv/bin:$PATH"

rm -rf "$project"
cookiecutter --no-input --output-dir "$root/build" "$root"
python -m pip install --quiet --no-build-isolation --editable "$project[dev]"
cd "$project"

secure-api keys generate --out .keys
export ENVIRONMENT=development
export JWT_PUBLIC_KEY="$(cat .keys/public.pem)"
export JWT_ISSUER=https://issuer.dev.local
export JWT_AUDIENCE=secure-api
alembic upgrade heads
token=$(secure-api token mint --private-key .keys/private.pem --sub dev-user --scope "$scopes")

cat <<MSG

secure-api is starting on http://127.0.0.1:8000 (Ctrl-C stops it).
In another terminal:

  curl -sS -X POST http://127.0.0.1:8000/api/v1/orgs -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d '{"name":"demo"}'
  curl http://127.0.0.1:8000/health/ready

A new token (this one expires): cd build/secure-api && $venv/bin/secure-api token mint --private-key .keys/private.pem --sub dev-user --scope "$scopes"
To watch each layer of the pipeline refuse a request, with the audit line it writes: make demo-tour

MSG
exec secure-api serve
