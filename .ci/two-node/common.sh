# Settings and helpers shared by setup.sh and teardown.sh (sourced, not run).
# Every setting can be overridden from the environment. The defaults keep clear of the first
# engine (/var/lib/docker, /var/run/docker*, docker0 on 172.17.0.0/16) and of the host's addresses.
TN_NS="${TN_NS:-evn2}"                          # network namespace of the second engine
TN_HOST_IF="${TN_HOST_IF:-evn2-host}"           # host end of the veth pair; the other end is eth0 in the namespace
TN_HOST_IP="${TN_HOST_IP:-10.231.0.1}"          # the first engine (manager) advertises this address
TN_NODE_IP="${TN_NODE_IP:-10.231.0.2}"          # the second engine (worker) advertises this address
TN_PREFIX="${TN_PREFIX:-24}"
TN_HOSTNAME="${TN_HOSTNAME:-evolvectl-node2}"   # the second node's name in `docker node ls`
TN_DATA_ROOT="${TN_DATA_ROOT:-/var/lib/docker2}"
TN_EXEC_ROOT="${TN_EXEC_ROOT:-/var/run/docker2}"
TN_SOCK="${TN_SOCK:-/var/run/docker2.sock}"
TN_PIDFILE="${TN_PIDFILE:-/var/run/docker2.pid}"
TN_LOG="${TN_LOG:-/var/log/dockerd2.log}"
TN_STATE="${TN_STATE:-/var/run/evolvectl-two-node.state}"  # what setup.sh changed on the first engine
TN_IMAGES="${TN_IMAGES:-evolvectl:test}"        # images copied into the second engine (space separated)
TN_TIMEOUT_S="${TN_TIMEOUT_S:-60}"
# Made by an engine when it joins a swarm; teardown.sh removes it only if setup.sh caused it.
GATEWAY_NETWORK="docker_gwbridge"

D1=(docker)                                     # the first engine, as the docker command finds it
D2=(docker -H "unix://$TN_SOCK")

log() { printf '[two-node] %s\n' "$*"; }
die() { printf '[two-node] error: %s\n' "$*" >&2; exit 1; }

# set -e stops a script at any failing command; that gets a one-line error too, naming the command.
# (die's own `exit 1` has already said why.)
report_failure() {
    local status="$1" command="$2"
    ((status == 0)) || [[ "$command" == exit* ]] \
        || printf '[two-node] error: %s stopped (exit %s) at: %s\n' "$(basename "$0")" "$status" "$command" >&2
}
trap 'report_failure $? "$BASH_COMMAND"' EXIT

# Runs a step and prints how long it took, so a slow image copy is easy to spot in CI logs.
timed() {
    local label="$1"; shift
    local started=$SECONDS
    "$@"
    log "$label: $((SECONDS - started)) s"
}

need_root() { [[ $EUID -eq 0 ]] || die "run as root: a network namespace, a veth pair and a second dockerd need it"; }

# swarm_field ENGINE... FIELD: one field of the engine's `docker info` Swarm section (empty if it does not answer).
swarm_field() {
    local field="${*: -1}"
    "${@:1:$#-1}" info --format "{{.Swarm.$field}}" 2>/dev/null
}

gateway_exists() { [[ -n "$("${D1[@]}" network ls -q --filter "name=^${GATEWAY_NETWORK}\$")" ]]; }

# The second dockerd's pid while it runs (from its pid file); fails when it does not run.
engine2_pid() {
    local pid
    [[ -f "$TN_PIDFILE" ]] || return 1
    pid="$(cat "$TN_PIDFILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && printf '%s\n' "$pid"
}
