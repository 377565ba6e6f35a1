#!/usr/bin/env bash
# Loopback check of the three demo apps, without the mesh: starts them on 127.0.0.1 ports,
# checks the call chain, crash/repair of service-c, /health, error texts, tracing-header
# propagation and a little concurrency, then stops everything it started.
# Exits 0 when every check passed, 1 otherwise.
#
#   deploy/demo/test-apps.sh
#
# Environment: TEST_BASE_PORT (default 18081; uses this port and the next five),
#              DENO (deno binary; default: whatever install-runtimes.sh installs or finds).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE="${TEST_BASE_PORT:-18081}"
PORT_A=$BASE PORT_B=$((BASE + 1)) PORT_C=$((BASE + 2))
PORT_ECHO=$((BASE + 3)) PORT_B2=$((BASE + 4)) PORT_A2=$((BASE + 5))
HOST=127.0.0.1

WORK="$(mktemp -d "${TMPDIR:-/tmp}/mesh-demo-test.XXXXXX")"
PIDS=()
FAILED=0

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; FAILED=1; }

# expect NAME ACTUAL EXPECTED
expect() {
    if [[ "$2" == "$3" ]]; then pass "$1: $2"; else fail "$1: got '$2', want '$3'"; fi
}
# expect_match NAME ACTUAL GLOB
expect_match() {
    # shellcheck disable=SC2053
    if [[ "$2" == $3 ]]; then pass "$1: $2"; else fail "$1: got '$2', want '$3'"; fi
}

# get URL -> "<status> <body>" (body with trailing newlines stripped)
get() {
    local out
    out="$(curl -sS --noproxy '*' --max-time 15 -w '\n%{http_code}' "$@" 2>&1)" || true
    local status="${out##*$'\n'}" body="${out%$'\n'*}"
    body="${body%$'\n'}"
    echo "$status $body"
}

wait_up() {
    local name=$1 port=$2 pid=$3 i
    for ((i = 0; i < 300; i++)); do
        if [[ "$(curl -s --noproxy '*' --max-time 1 "http://$HOST:$port/health" 2>/dev/null)" == UP ]]; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            fail "$name exited during start-up; its log:"
            sed 's/^/    /' "$WORK/$name.log"
            exit 1
        fi
        sleep 0.1
    done
    fail "$name not up on port $port after 30 s; its log:"
    sed 's/^/    /' "$WORK/$name.log"
    exit 1
}

# start NAME PORT APP [VAR=value...]
start() {
    local name=$1 port=$2 app=$3
    shift 3
    env PORT="$port" "$@" "$HERE/run-app.sh" "$app" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    eval "PID_${name//-/_}=$!"
}

stop() {
    local var="PID_${1//-/_}"
    kill "${!var}" 2>/dev/null
    wait "${!var}" 2>/dev/null
}

for port in $PORT_A $PORT_B $PORT_C $PORT_ECHO $PORT_B2 $PORT_A2; do
    if curl -s --noproxy '*' --max-time 1 -o /dev/null "http://$HOST:$port/" 2>/dev/null; then
        echo "port $port is already in use on $HOST; set TEST_BASE_PORT" >&2
        exit 1
    fi
done

if [[ -z "${DENO:-}" ]]; then
    DENO="$("$HERE/install-runtimes.sh" | tail -n1)" || { echo "install-runtimes.sh failed" >&2; exit 1; }
fi
export DENO
command -v java >/dev/null || { echo "java missing (run install-runtimes.sh)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 missing" >&2; exit 1; }

# Echo server standing in for service-c: answers with the request headers it received.
cat >"$WORK/echo.py" <<'EOF'
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = b"UP"
        else:
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}, sort_keys=True).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
EOF

echo "# starting the apps on $HOST:$PORT_A (A) -> $PORT_B (B) -> $PORT_C (C), deno: $DENO"
start service-c "$PORT_C" service-c VERSION=v1 HOSTNAME=service-c-v1-abc12
start service-b "$PORT_B" service-b SERVICE_C_HOST="$HOST:$PORT_C"
start service-a "$PORT_A" service-a SERVICE_B_HOST="$HOST:$PORT_B"
python3 "$WORK/echo.py" "$PORT_ECHO" >"$WORK/echo.log" 2>&1 &
PIDS+=($!)
PID_echo=$!
start service-b2 "$PORT_B2" service-b SERVICE_C_HOST="$HOST:$PORT_ECHO"
start service-a2 "$PORT_A2" service-a SERVICE_B_HOST="$HOST:$PORT_B2"
started=$SECONDS
wait_up service-c "$PORT_C" "$PID_service_c"
wait_up service-b "$PORT_B" "$PID_service_b"
wait_up service-a "$PORT_A" "$PID_service_a"
wait_up echo "$PORT_ECHO" "$PID_echo"
wait_up service-b2 "$PORT_B2" "$PID_service_b2"
wait_up service-a2 "$PORT_A2" "$PID_service_a2"
echo "# all up after $((SECONDS - started)) s"

A="http://$HOST:$PORT_A" B="http://$HOST:$PORT_B" C="http://$HOST:$PORT_C"

echo "# health"
expect "A /health" "$(get "$A/health")" "200 UP"
expect "B /health" "$(get "$B/health")" "200 UP"
expect "C /health" "$(get "$C/health")" "200 UP"

echo "# call chain"
expect "A / (1st)" "$(get "$A/")" "200 Service A <- Service B <- Service C | v1 | abc12 | 1"
expect "A / (2nd)" "$(get "$A/")" "200 Service A <- Service B <- Service C | v1 | abc12 | 2"
expect "B /" "$(get "$B/")" "200 Service B <- Service C | v1 | abc12 | 3"
expect "C /" "$(get "$C/")" "200 Service C | v1 | abc12 | 4"
expect "A /unknown" "$(get "$A/unknown")" "404 Page not found"

echo "# crash and repair of service-c"
expect "C /crash" "$(get "$C/crash")" "200 crashed"
expect "C / (crashed)" "$(get "$C/")" "500 Error 500 (Hostname: abc12)"
expect "C /health (crashed)" "$(get "$C/health")" "200 UP"
expect "B / (C crashed)" "$(get "$B/")" "200 Service B <- Error: Error 500 (Hostname: abc12)"
expect "A / (C crashed)" "$(get "$A/")" "200 Service A <- Service B <- Error: Error 500 (Hostname: abc12)"
expect "C /repair" "$(get "$C/repair")" "200 repaired"
expect "A / (repaired)" "$(get "$A/")" "200 Service A <- Service B <- Service C | v1 | abc12 | 8"

echo "# concurrency: 64 requests, 16 at a time"
seq 64 | xargs -P 16 -I{} curl -s --noproxy '*' --max-time 15 "$A/" -o "$WORK/par.{}" -w '%{http_code}\n' >"$WORK/par.codes"
ok=$(grep -c '^200$' "$WORK/par.codes")
good=$(cat "$WORK"/par.[0-9]* | grep -c '^Service A <- Service B <- Service C | v1 | abc12 | [0-9]*$')
expect "parallel 200s" "$ok" 64
expect "parallel full chains" "$good" 64
expect "A / (after parallel)" "$(get "$A/")" "200 Service A <- Service B <- Service C | v1 | abc12 | 73"

echo "# tracing headers reach the next hop (A2 -> B2 -> echo)"
headers="$(curl -sS --noproxy '*' --max-time 15 "http://$HOST:$PORT_A2/" \
    -H 'x-request-id: 4f7e1a9c-test-request' \
    -H 'X-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124' \
    -H 'x-b3-spanid: a2fb4a1d1a96d312' \
    -H 'x-b3-parentspanid: 0020000000000001' \
    -H 'x-b3-sampled: 1' \
    -H 'x-b3-flags: 0' \
    -H 'b3: 463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1' \
    -H 'traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' \
    -H 'tracestate: mesh=demo' \
    -H 'x-not-propagated: secret')"
echo "    $headers"
json="${headers#Service A <- Service B <- }"
check_header() {
    local got
    got="$(printf '%s' "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], "<absent>"))' "$1" 2>/dev/null)"
    expect "header $1 at the next hop" "$got" "$2"
}
check_header x-request-id 4f7e1a9c-test-request
check_header x-b3-traceid 463ac35c9f6413ad48485a3953bb6124
check_header x-b3-spanid a2fb4a1d1a96d312
check_header x-b3-parentspanid 0020000000000001
check_header x-b3-sampled 1
check_header x-b3-flags 0
check_header b3 463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1
check_header traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
check_header tracestate mesh=demo
check_header x-not-propagated "<absent>"

echo "# error texts when the next hop is down"
stop echo
expect_match "A2 / (C down)" "$(get "http://$HOST:$PORT_A2/")" \
    "200 Service A <- Service B <- Error: fetch failed (*Connection refused*)"
stop service-b2
expect_match "A2 / (B down)" "$(get "http://$HOST:$PORT_A2/")" \
    "200 Service A <- Service B | *Connection refused*"

if [[ $FAILED == 0 ]]; then
    echo "# PASS: all demo app checks passed"
    exit 0
fi
echo "# FAILED: see the FAIL lines above"
exit 1
