#!/bin/bash
# A follower catching up while the other follower dies (issue 24). Usage:
#   catch-up.sh TALLY_BINARY TAG BASE_PORT RATE
# Starts `tally dev` in /tmp/exp-TAG, sends RATE requests/s of 100 transfers for 50 s, pauses node 3
# for 6 s at t=15 s, kills node 2 at t=25 s, and polls every node's last log, committed and
# applied index every 250 ms (poll.txt, events.txt, load.txt in /tmp/exp-TAG). The load's final
# digest check fails by design: node 2 is down. Then `catch-up-report.py TAG...` prints the
# slowest second of commits after the kill. Compare two builds interleaved (A B A B).
BIN=$1; TAG=$2; PORT=$3; RATE=$4; D=/tmp/exp-$TAG
rm -rf $D; mkdir -p $D
$BIN dev --dir $D --base-port $PORT > $D/dev.log 2>&1 &
DEV=$!
sleep 6
NODES=127.0.0.1:$((PORT+1)),127.0.0.1:$((PORT+2)),127.0.0.1:$((PORT+3))
$BIN benchmark --nodes $NODES --ca $D/certs/ca.pem --cert $D/certs/operator-cli.pem \
  --key $D/certs/operator-cli.key --clients 8 --batch 100 --rate $RATE --warmup 0s --duration 50s \
  --seed 7 > $D/load.txt 2>&1 &
LOAD=$!
poll() {
  for i in 1 2 3; do
    curl -s -m 0.2 127.0.0.1:$((PORT+200+i))/metrics | awk -v n=$i '/^tally_raft_(last_log|committed|applied)_index |^tally_raft_is_leader /{printf "%s=%s ", substr($1,12,4) , $2} END{printf "| "}' | sed "s/^/n$i /"
  done
}
START=$(date +%s.%N)
now() { echo "$(date +%s.%N) - $START" | bc; }
( while kill -0 $LOAD 2>/dev/null; do printf "%6.2f " $(now); poll; echo; sleep 0.25; done ) > $D/poll.txt &
sleep 15
P3=$(pgrep -f "serve --cluster dev --id 3 .*$D")
kill -STOP $P3; echo "$(now) STOP 3" >> $D/events.txt
sleep 6
kill -CONT $P3; echo "$(now) CONT 3" >> $D/events.txt
sleep 4
kill -9 $(pgrep -f "serve --cluster dev --id 2 .*$D"); echo "$(now) KILL 2" >> $D/events.txt
wait $LOAD
kill $DEV; sleep 2; pkill -f "$D"; sleep 1
cat $D/events.txt; grep "transfers (latency" $D/load.txt
