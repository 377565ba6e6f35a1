#!/usr/bin/env bash
# Installs what the demo apps need to run locally, idempotently and non-interactively:
#   - Deno (service-b), from the npm package `deno` (it ships the binary), into
#     ${MESH_CACHE:-$HOME/.cache/mesh}/deno, unless it is already there;
#   - a Java runtime (service-c) with apt-get, if `java` is missing (needs root);
#   - python3 (service-a) is assumed to be present.
# Progress goes to stderr, one `install-runtimes: ...` line per phase (what it found, what it
# installs, and how long an install took; `cargo xtask demo` shows these lines) amid the output
# of apt-get and npm. The LAST line on stdout is the absolute path of the deno binary.
#
# Environment: MESH_CACHE (cache root), DENO_VERSION (default: the pinned version below).
set -euo pipefail

DENO_VERSION="${DENO_VERSION:-2.9.6}"
CACHE="${MESH_CACHE:-${HOME:-/root}/.cache/mesh}"
DENO_PREFIX="$CACHE/deno"

log() { echo "install-runtimes: $*" >&2; }

# Several tests run this at once on a fresh machine: the first installs while the others wait
# here, then find what it installed. Without the lock a second npm rewrote the prefix under the
# first, and a second apt-get fails on dpkg's lock.
mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/install-runtimes.lock"
    flock 9
fi

# The npm package `deno` depends on one optional package per platform that holds the binary.
deno_platform_package() {
    local arch
    case "$(uname -m)" in
        x86_64 | amd64) arch=x64 ;;
        aarch64 | arm64) arch=arm64 ;;
        *) log "unsupported CPU $(uname -m) for the deno npm package"; return 1 ;;
    esac
    echo "@deno/linux-${arch}-glibc"
}

# Prints the deno binary of the prefix if it is there and is the pinned version.
find_deno() {
    local pkg candidate
    pkg="$(deno_platform_package)" || return 1
    for candidate in "$DENO_PREFIX/node_modules/$pkg/deno" "$DENO_PREFIX/node_modules/deno/deno"; do
        [[ -x "$candidate" ]] || continue
        local version
        version="$("$candidate" --version 2>/dev/null || true)"
        if [[ "${version%%$'\n'*}" == "deno $DENO_VERSION "* ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install_deno() {
    if ! command -v npm >/dev/null 2>&1; then
        log "npm is missing; installing it with apt-get"
        apt_install npm
    fi
    log "installing deno@$DENO_VERSION from npm into $DENO_PREFIX (once) ..."
    mkdir -p "$DENO_PREFIX"
    # The platform package is named explicitly so the binary lands even if npm skips
    # optional dependencies or the postinstall script.
    npm install --prefix "$DENO_PREFIX" --no-audit --no-fund --loglevel=error \
        "deno@$DENO_VERSION" "$(deno_platform_package)@$DENO_VERSION" >&2
}

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found; please install: $*"
        return 1
    fi
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [[ "$APT_UPDATED" == 0 ]]; then
        log "apt-get update ..."
        "${sudo[@]}" apt-get update -q >&2
        APT_UPDATED=1
    fi
    log "apt-get install $* ..."
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" >&2
}

# --- python3 -----------------------------------------------------------------------------------
if ! command -v python3 >/dev/null 2>&1; then
    log "warning: python3 not found (service-a needs it)"
fi

# --- java --------------------------------------------------------------------------------------
# `java ServiceC.java` (the source launcher) needs the jdk.compiler module, and the app the
# jdk.httpserver module. Debian's JRE packages ship every module; slimmer JREs may not.
java_ok() {
    local modules
    command -v java >/dev/null 2>&1 || return 1
    modules="$(java --list-modules 2>/dev/null || true)"
    [[ "$modules" == *jdk.compiler@* && "$modules" == *jdk.httpserver@* ]]
}
if java_ok; then
    log "java present: $(java -version 2>&1 | head -n1)"
else
    started=$SECONDS
    if command -v java >/dev/null 2>&1; then
        log "java lacks jdk.compiler or jdk.httpserver; installing a headless JDK with apt-get (once) ..."
        apt_install default-jdk-headless || apt_install openjdk-17-jdk-headless
    else
        log "java missing; installing a headless JRE with apt-get (once) ..."
        apt_install default-jre-headless || apt_install openjdk-17-jre-headless
    fi
    java_ok || { log "no usable java (with jdk.compiler and jdk.httpserver) after apt-get"; exit 1; }
    log "java installed in $((SECONDS - started)) s: $(java -version 2>&1 | head -n1)"
fi

# --- deno --------------------------------------------------------------------------------------
if DENO_BIN="$(find_deno)"; then
    log "deno $DENO_VERSION already installed"
else
    started=$SECONDS
    install_deno
    DENO_BIN="$(find_deno)" || { log "deno $DENO_VERSION not found in $DENO_PREFIX after npm install"; exit 1; }
    log "deno $DENO_VERSION installed in $((SECONDS - started)) s"
fi

echo "$DENO_BIN"
