#!/bin/bash
# How long a node's log takes to open (issue 24). Usage: log-open.sh OLD_BINARY NEW_BINARY
# A `tally dev` cluster (NEW) in /tmp/logopen under batch load for 90 s (about 1 GiB of log on
# this machine); node 3 is then SIGKILLed and started again with OLD, NEW, NEW, OLD, NEW in turn
# (no load), each start's "storage open" line printed. The first NEW start after an OLD one
# writes the segments' record indexes; OLD ignores them.
OLD=$1; NEW=$2; PORT=7800; D=/tmp/logopen
rm -rf $D; mkdir -p $D
$NEW dev --dir $D --base-port $PORT > $D/dev.log 2>&1 &
DEV=$!
sleep 6
NODES=127.0.0.1:$((PORT+1)),127.0.0.1:$((PORT+2)),127.0.0.1:$((PORT+3))
$NEW benchmark --nodes $NODES --ca $D/certs/ca.pem --cert $D/certs/operator-cli.pem \
  --key $D/certs/operator-cli.key --clients 4 --duration 90s --quiet --seed 7 > $D/load.txt 2>&1
CMD=$(ps -o args= -p $(pgrep -f "serve --cluster dev --id 3 .*$D") | cut -d' ' -f2-)
kill -9 $(pgrep -f "serve --cluster dev --id 3 .*$D")
du -sh $D/node-3/wal
for BIN in $OLD $NEW $NEW $OLD $NEW; do
  $BIN $CMD > $D/n3.log 2>&1 &
  P=$!
  for i in $(seq 100); do grep -q "storage open" $D/n3.log && break; sleep 0.2; done
  echo "$BIN: $(grep -o 'storage open in.*ms, the ledger' $D/n3.log)"
  kill -9 $P; wait $P 2>/dev/null
done
kill $DEV; sleep 2; pkill -f "$D"; sleep 1
