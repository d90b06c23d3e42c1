#!/bin/bash
# The PostgreSQL yardstick of docs/performance.md: a primary and two standbys on 127.0.0.1, a
# commit waits for either standby (`synchronous_standby_names = 'ANY 1 (s1, s2)'`, a 2-of-3
# quorum like tally's three sites), fsync on, plaintext; pgbench runs one transfer per
# transaction (two balance updates, rows locked in id order) over 10,000 accounts.
#
#   scripts/pg-peer.sh [clients] [seconds]     # default: 1 client, 10 s
#
# Prints pgbench's figures (transactions/s, average latency). It does not change between tally's
# builds: run it in the same sitting as a before/after comparison whose figures moved, to tell
# the build from the machine. Needs Debian's postgresql and postgresql-contrib (pgbench):
#   apt-get update && apt-get install -y postgresql postgresql-contrib
# Runs the servers as the `postgres` user (PostgreSQL refuses root) in a temporary directory,
# removed with the servers stopped on exit.
set -euo pipefail

clients=${1:-1}
seconds=${2:-10}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [[ -z "$bin" ]] || ! command -v pgbench > /dev/null; then
  echo "pg-peer: PostgreSQL not found; apt-get update && apt-get install -y postgresql postgresql-contrib" >&2
  exit 2
fi
as_postgres() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

dir=$(mktemp -d /tmp/pg-peer.XXXXXX)
chmod 755 "$dir"
[[ $(id -u) == 0 ]] && chown postgres "$dir"
names=(primary s1 s2)
declare -A port
for name in "${names[@]}"; do port[$name]=$(free_port); done
cleanup() {
  for name in "${names[@]}"; do
    [[ -f "$dir/$name/postmaster.pid" ]] && as_postgres "$bin/pg_ctl" -D "$dir/$name" -m immediate stop > /dev/null 2>&1 || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT

as_postgres "$bin/initdb" -D "$dir/primary" -U postgres --auth=trust > /dev/null
cat >> "$dir/primary/postgresql.conf" << EOF
listen_addresses = '127.0.0.1'
port = ${port[primary]}
unix_socket_directories = '$dir'
fsync = on
synchronous_commit = on
synchronous_standby_names = 'ANY 1 (s1, s2)'
wal_level = replica
max_wal_senders = 4
EOF
echo "host replication postgres 127.0.0.1/32 trust" >> "$dir/primary/pg_hba.conf"
as_postgres "$bin/pg_ctl" -D "$dir/primary" -l "$dir/primary.log" -w start > /dev/null
for name in s1 s2; do
  as_postgres "$bin/pg_basebackup" -h 127.0.0.1 -p "${port[primary]}" -U postgres -D "$dir/$name" -R > /dev/null
  echo "port = ${port[$name]}" >> "$dir/$name/postgresql.conf"
  # After pg_basebackup -R's own primary_conninfo in postgresql.auto.conf, which would win.
  echo "primary_conninfo = 'host=127.0.0.1 port=${port[primary]} user=postgres application_name=$name'" \
    >> "$dir/$name/postgresql.auto.conf"

  as_postgres "$bin/pg_ctl" -D "$dir/$name" -l "$dir/$name.log" -w start > /dev/null
done

psql_primary() { as_postgres psql -X -q -h 127.0.0.1 -p "${port[primary]}" -U postgres "$@"; }
for _ in $(seq 1 100); do
  streaming=$(psql_primary -At -c "select count(*) from pg_stat_replication
    where state = 'streaming' and application_name in ('s1', 's2')")
  [[ "$streaming" == 2 ]] && break
  sleep 0.1
done
if [[ "$streaming" != 2 ]]; then
  echo "pg-peer: the standbys did not start streaming within 10 s; logs in $dir" >&2
  trap - EXIT
  exit 1
fi
psql_primary -c "create table accounts (id int primary key, balance bigint not null);
  insert into accounts select id, 0 from generate_series(1, 10000) id;"
cat > "$dir/transfer.sql" << 'EOF'
\set a random(1, 10000)
\set b random(1, 10000)
BEGIN;
UPDATE accounts SET balance = balance - 1 WHERE id = least(:a, :b)::int;
UPDATE accounts SET balance = balance + 1 WHERE id = greatest(:a, :b)::int;
COMMIT;
EOF
chmod 644 "$dir/transfer.sql"
as_postgres pgbench -n -M prepared -h 127.0.0.1 -p "${port[primary]}" -U postgres -c "$clients" -j "$clients" \
  -T "$seconds" -f "$dir/transfer.sql" postgres 2>&1 | grep -E "clients|failed|latency|tps"
