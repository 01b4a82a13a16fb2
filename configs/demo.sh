#!/usr/bin/env bash
# `make demo`: the built-in emulator on a free loopback port, a real harvest against it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p .demo
urls=.demo/emulator.json
rm -f "$urls"

"$BIN/harvester" emulator --host 127.0.0.1 --port 0 --scenario configs/scenarios/demo.toml \
    >"$urls" 2>.demo/emulator.log &
emulator=$!
trap 'kill "$emulator" 2>/dev/null || true; wait "$emulator" 2>/dev/null || true' EXIT

for _ in $(seq 1 200); do
    [ -s "$urls" ] && break
    kill -0 "$emulator" 2>/dev/null || { echo "emulator failed to start:" >&2; cat .demo/emulator.log >&2; exit 1; }
    sleep 0.05
done
[ -s "$urls" ] || { echo "emulator did not report its addresses in 10 s" >&2; exit 1; }
echo "emulator: $(cat "$urls")"

url() { "$BIN/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$urls" "$1"; }
export HARVESTER_DEMO_PLAYMENT_URL HARVESTER_DEMO_COGNITE_URL HARVESTER_DEMO_BENTLEY_URL \
       HARVESTER_DEMO_MODZY_URL HARVESTER_DEMO_TOKEN_URL
HARVESTER_DEMO_PLAYMENT_URL=$(url playment)
HARVESTER_DEMO_COGNITE_URL=$(url cognite)
HARVESTER_DEMO_BENTLEY_URL=$(url bentley)
HARVESTER_DEMO_MODZY_URL=$(url modzy)
HARVESTER_DEMO_TOKEN_URL=$(url token)
# The emulator accepts any key or client secret; a real deployment reads its secrets from the
# environment or from files (*_env / *_file in the config), never from the config itself.
export PLAYMENT_API_KEY=demo-playment-key MODZY_API_KEY=demo.modzy-key \
       COGNITE_CLIENT_SECRET=demo-cognite-secret BENTLEY_CLIENT_SECRET=demo-bentley-secret

status=0
"$BIN/harvester" harvest -c configs/demo.toml configs/demo-jobs.jsonl || status=$?
echo "outputs: .demo/output  (store: .demo/state.db; 'make demo-clean' starts afresh)"
exit "$status"
