#!/usr/bin/env bash
# The single-node demo (the cluster demo is scripts/demo.sh): build the examples and the node, start a node, deploy the
# examples, run transactions (one that aborts), show an idempotent retry, then kill
# the node with SIGKILL in the middle of a workload and show that every acknowledged
# transaction survived the restart.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PORT=${PORT:-7170}
export UNDERSTUDY_NODE="http://127.0.0.1:$PORT"
DATA=$(mktemp -d /tmp/understudy-demo.XXXXXX)
BIN="$ROOT/target/release/understudy"
NODE_PID=""
cleanup() { [ -n "$NODE_PID" ] && kill -9 "$NODE_PID" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1/6 Building the example functions to WebAssembly components"
./scripts/build-guests.sh

step "2/6 Building the node (release; the first build takes several minutes)"
cargo build --release --bin understudy 2>&1 | tail -n 1

start_node() {
  "$BIN" node --data-dir "$DATA" --listen "127.0.0.1:$PORT" >>"$DATA/node.log" 2>&1 &
  NODE_PID=$!
  disown "$NODE_PID"
  for _ in $(seq 1 100); do
    curl -fs "$UNDERSTUDY_NODE/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the node did not start; its log:"; cat "$DATA/node.log"; exit 1
}

step "3/6 Starting a node on 127.0.0.1:$PORT (data in $DATA, durability: disk)"
start_node
echo "node running, pid $NODE_PID"

step "4/6 Deploying and invoking the examples"
C="$ROOT/target-guests/components"
run "$BIN" deploy counter "$C/counter.wasm"
run "$BIN" deploy bank "$C/bank.wasm"
run "$BIN" deploy inventory "$C/inventory.wasm"
run "$BIN" functions
run "$BIN" invoke counter increment
run "$BIN" invoke counter increment '{"by": 41}'
run "$BIN" invoke bank open '{"account": "alice", "initial": 100}'
run "$BIN" invoke bank open '{"account": "bob", "initial": 50}'
run "$BIN" invoke bank transfer '{"from": "alice", "to": "bob", "amount": 30}'
echo "# an overdraft aborts the whole transaction: nothing it wrote remains"
run "$BIN" invoke bank withdraw '{"account": "bob", "amount": 1000}' || true
run "$BIN" invoke bank total
run "$BIN" invoke inventory stock '{"item": "apple", "quantity": 5}'
run "$BIN" invoke inventory stock '{"item": "pear", "quantity": 1}'
echo "# an order is all or nothing: pear is short, so no apple is reserved either"
run "$BIN" invoke inventory order '{"order": "o1", "items": [{"item": "apple", "quantity": 2}, {"item": "pear", "quantity": 3}]}' || true
run "$BIN" invoke inventory item '{"item": "apple"}'
echo "# a retry with the same idempotency key gets the original answer; the handler does not run again"
run "$BIN" invoke counter increment --idempotency-key demo-1
run "$BIN" invoke counter increment --idempotency-key demo-1
run "$BIN" invoke counter get

step "5/6 Killing the node with SIGKILL in the middle of 2000 transfers from 4 clients"
ACKED="$DATA/acked"
: >"$ACKED"
WORKERS=()
for w in 0 1 2 3; do
  (
    for j in $(seq 1 500); do
      i=$((w * 500 + j))
      if [ $((i % 2)) = 0 ]; then from=alice; to=bob; else from=bob; to=alice; fi
      if "$BIN" invoke bank transfer "{\"from\": \"$from\", \"to\": \"$to\", \"amount\": 1}" \
          --idempotency-key "t-$i" >/dev/null 2>&1; then echo "$i" >>"$ACKED"; fi
    done
  ) &
  WORKERS+=($!)
done
sleep 1
kill -9 "$NODE_PID"
while kill -0 "$NODE_PID" 2>/dev/null; do sleep 0.01; done
echo "killed node pid $NODE_PID after $(wc -l <"$ACKED") acknowledged transfers (the clients now get errors)"
wait "${WORKERS[@]}" || true

step "6/6 Restarting on the same data directory"
start_node
grep -E "recovered|torn" "$DATA/node.log" | tail -n 2 | sed 's/\x1b\[[0-9;]*m//g'
echo "# every acknowledged transfer is there: replaying its idempotency key returns the remembered answer"
missing=0
while read -r i; do
  out=$(curl -s -o /dev/null -w '%{http_code} ' -D - -X POST "$UNDERSTUDY_NODE/v1/functions/bank/transfer" \
    -H "idempotency-key: t-$i" -H 'content-type: application/json' -d '{"from":"alice","to":"bob","amount":1}')
  echo "$out" | grep -qi 'idempotent-replayed: true' || missing=$((missing + 1))
done <"$ACKED"
echo "acknowledged transfers: $(wc -l <"$ACKED"), missing after the crash: $missing"
run "$BIN" invoke bank total
total=$("$BIN" invoke bank total | sed -E 's/.*"total":([0-9]+).*/\1/')
if [ "$missing" = 0 ] && [ "$total" = 150 ]; then
  printf '\n\033[1mOK\033[0m: no acknowledged transaction lost, bank total conserved (150).\n'
else
  printf '\n\033[1mFAILED\033[0m: missing=%s total=%s (expected 0 and 150)\n' "$missing" "$total"; exit 1
fi
