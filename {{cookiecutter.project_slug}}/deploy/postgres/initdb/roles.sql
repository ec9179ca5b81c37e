-- compose.yaml's PostgreSQL, run once by the image when its volume is first initialised: the two
-- roles of README "Database access", named and given passwords by the service's two URLs (the
-- secrets database_owner_url and database_url), so each credential is written in one place.
-- The owner owns the database and migrates; the app role may only log in until the migrations
-- grant it what the service needs (DATABASE_APP_ROLE). Passwords must be URL-safe as written
-- (secrets.token_urlsafe): they are taken from the URLs as they are, not percent-decoded.
\set ON_ERROR_STOP on
\set owner_url `cat /run/secrets/database_owner_url`
\set app_url `cat /run/secrets/database_url`

SELECT format(
    'CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
    substring(url FROM '://([^:/@]+):'),
    substring(url FROM '://[^:/@]+:([^@]+)@')
)
FROM (VALUES (:'owner_url'), (:'app_url')) AS urls (url) \gexec

SELECT format('ALTER DATABASE %I OWNER TO %I', current_database(), substring(:'owner_url' FROM '://([^:/@]+):')) \gexec
SELECT format('GRANT CREATE, USAGE ON SCHEMA public TO %I', substring(:'owner_url' FROM '://([^:/@]+):')) \gexec
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
