#!/bin/sh
# Stand-in for the official postgres image's entrypoint (POSTGRES_USER/PASSWORD/DB), Debian's PostgreSQL 15.
set -e
PGDATA=/var/lib/postgresql/data
BIN=/usr/lib/postgresql/15/bin
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pw && chown postgres /tmp/pw
  su postgres -s /bin/sh -c "$BIN/initdb -D $PGDATA -U $POSTGRES_USER --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256" >/dev/null
  rm -f /tmp/pw
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  su postgres -s /bin/sh -c "$BIN/pg_ctl -D $PGDATA -w -o '-c listen_addresses=' start" >/dev/null
  su postgres -s /bin/sh -c "psql -U $POSTGRES_USER -d postgres -c 'CREATE DATABASE $POSTGRES_DB'" >/dev/null
  su postgres -s /bin/sh -c "$BIN/pg_ctl -D $PGDATA -w stop" >/dev/null
fi
exec su postgres -s /bin/sh -c "exec $BIN/postgres -D $PGDATA -c listen_addresses='*'"
