#!/usr/bin/env bash
# Starts one demo app in the foreground (exec), the way `cargo xtask demo` and test-apps.sh do:
#
#   run-app.sh service-a     python3 service-a/app.py
#   run-app.sh service-b     deno run --allow-net --allow-env service-b/main.ts
#   run-app.sh service-c     java service-c/ServiceC.java
#
# The apps read PORT (default 8080) and SERVICE_B_HOST / SERVICE_C_HOST / VERSION / HOSTNAME
# from the environment (see README.md). HTTP proxy variables are removed from the app's
# environment: Python's urllib and Deno's fetch would otherwise send the calls to a proxy,
# and the apps must talk plain HTTP to their peers, exactly as in a pod.
# Deno is taken from $DENO, else `deno` on PATH, else the copy install-runtimes.sh put in
# ${MESH_CACHE:-$HOME/.cache/mesh}/deno.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

find_deno() {
    if [[ -n "${DENO:-}" ]]; then echo "$DENO"; return; fi
    if command -v deno >/dev/null 2>&1; then command -v deno; return; fi
    local cache="${MESH_CACHE:-${HOME:-/root}/.cache/mesh}/deno/node_modules" candidate
    for candidate in "$cache"/@deno/linux-*-glibc/deno "$cache/deno/deno"; do
        if [[ -x "$candidate" ]]; then echo "$candidate"; return; fi
    done
    echo "run-app.sh: deno not found; run $HERE/install-runtimes.sh first" >&2
    exit 1
}

case "${1:-}" in
    service-a | a)
        exec python3 -u "$HERE/service-a/app.py"
        ;;
    service-b | b)
        # No update check and no permission prompts: nothing is fetched at run time.
        export DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1
        exec "$(find_deno)" run --no-prompt --allow-net --allow-env "$HERE/service-b/main.ts"
        ;;
    service-c | c)
        exec java "$HERE/service-c/ServiceC.java"
        ;;
    *)
        echo "usage: $0 service-a|service-b|service-c   (env: PORT, SERVICE_B_HOST, SERVICE_C_HOST, VERSION, HOSTNAME)" >&2
        exit 2
        ;;
esac
