#!/usr/bin/env bash
# Starts one demo app in the foreground (exec), the way `cargo xtask demo` and test-apps.sh do:
#
#   run-app.sh service-a     python3 service-a/app.py
#   run-app.sh service-b     deno run --allow-net --allow-env service-b/main.ts
#   run-app.sh service-c     java -cp <compiled> ServiceC   (see below)
#   run-app.sh prepare       compiles service-c now if needed, says so on stderr, and exits
#
# Service C is compiled once per source and JDK into ${MESH_CACHE:-$HOME/.cache/mesh}/service-c/
# (`java ServiceC.java`, the source launcher, would compile it in memory at every start: seconds
# of CPU per replica on a busy machine). `prepare` lets a caller show that step on its own.
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

# Prints the directory holding ServiceC.class for this source and this JDK, compiling it first
# if it is not there. Uses the jdk.compiler module through `java` (install-runtimes.sh checks it
# is there), so a JRE with that module is enough.
compiled_service_c() {
    local source="$HERE/service-c/ServiceC.java" java key dir tmp started=$SECONDS
    java="$(readlink -f "$(command -v java)")"
    key="$( { sha256sum <"$source"; echo "$java"; } | sha256sum | cut -c1-16)"
    dir="${MESH_CACHE:-${HOME:-/root}/.cache/mesh}/service-c/$key"
    if [[ ! -f "$dir/ServiceC.class" ]]; then
        echo "run-app: compiling service-c/ServiceC.java into $dir (once) ..." >&2
        mkdir -p "$(dirname "$dir")"
        tmp="$(mktemp -d "$dir.XXXXXX")" && chmod 755 "$tmp"
        java -m jdk.compiler/com.sun.tools.javac.Main -d "$tmp" "$source" >&2
        # Replicas starting together may both compile: the first rename wins, the others find
        # the directory there (rename onto a non-empty directory fails) and drop their copy.
        mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
        echo "run-app: service-c compiled in $((SECONDS - started)) s" >&2
    fi
    echo "$dir"
}

case "${1:-}" in
    prepare)
        compiled_service_c >/dev/null
        ;;
    service-a | a)
        exec python3 -u "$HERE/service-a/app.py"
        ;;
    service-b | b)
        # No update check and no permission prompts: nothing is fetched at run time.
        export DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1
        exec "$(find_deno)" run --no-prompt --allow-net --allow-env "$HERE/service-b/main.ts"
        ;;
    service-c | c)
        exec java -cp "$(compiled_service_c)" ServiceC
        ;;
    *)
        echo "usage: $0 service-a|service-b|service-c|prepare   (env: PORT, SERVICE_B_HOST, SERVICE_C_HOST, VERSION, HOSTNAME)" >&2
        exit 2
        ;;
esac
