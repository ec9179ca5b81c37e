#!/usr/bin/env bash
# Bake the default service into build/secure-api, install its locked runtime set (uv.lock, no dev
# tools) into its own .venv, migrate its SQLite database, make a development key pair and token,
# then run it on 127.0.0.1:8000. Needs only uv (UV, else uv on PATH) and Python 3.11+: cookiecutter
# runs from uv's tool cache.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
uv=${UV:-uv}
case "$uv" in /*) ;; */*) uv="$root/$uv" ;; esac
project="$root/build/secure-api"
venv="$project/.venv"
scopes="orgs:read orgs:write users:read users:write"

rm -rf "$project"
"$uv" tool run --quiet --from "cookiecutter>=2.6" cookiecutter --no-input --output-dir "$root/build" "$root" >/dev/null
cd "$project"
UV_PROJECT_ENVIRONMENT="$venv" "$uv" sync --quiet --locked --all-packages --no-dev --python "${PYTHON:-python3}"
export PATH="$venv/bin:$PATH"

export ENVIRONMENT=development
export JWT_ISSUER=https://issuer.dev.local
export JWT_AUDIENCE=secure-api
# Importing the service is the slow part of a demo on a small machine: the migration runs beside
# `secure-api keys generate --out .keys` and `secure-api token mint`, and those two share one process.
alembic upgrade heads &
migration=$!
token=$(python - "$scopes" <<'PY'
import contextlib, sys
from secure_api.cli import main
with contextlib.redirect_stdout(sys.stderr):
    main(["keys", "generate", "--out", ".keys"])
sys.exit(main(["token", "mint", "--private-key", ".keys/private.pem", "--sub", "dev-user", "--scope", sys.argv[1]]))
PY
)
export JWT_PUBLIC_KEY="$(cat .keys/public.pem)"
wait "$migration"

cat <<MSG

secure-api is starting on http://127.0.0.1:8000 (Ctrl-C stops it).
In another terminal:

  curl -sS -X POST http://127.0.0.1:8000/api/v1/orgs -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d '{"name":"demo"}'
  curl http://127.0.0.1:8000/health/ready

A new token (this one expires): cd build/secure-api && $venv/bin/secure-api token mint --private-key .keys/private.pem --sub dev-user --scope "$scopes"
To watch each layer of the pipeline refuse a request, with the audit line it writes: make demo-tour

MSG
exec secure-api serve
