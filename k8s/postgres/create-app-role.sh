#!/bin/sh
# pgbeat's application role: it owns the pgbeat database, so `pgbeat migrate`
# can create the schema, but it is not a superuser. The postgres image runs this
# once, when it creates a new data directory (/docker-entrypoint-initdb.d); to
# change the password later: ALTER ROLE pgbeat PASSWORD '...'.
# psql quotes the password (:'password'), so any character in it is safe.
set -eu
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    --set=password="$PGBEAT_DB_PASSWORD" <<'SQL'
CREATE ROLE pgbeat LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE pgbeat OWNER pgbeat;
SQL
