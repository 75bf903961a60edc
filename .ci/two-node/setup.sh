#!/usr/bin/env bash
# A two-node Docker Swarm on one machine: the running engine becomes the manager, and a second
# dockerd in its own network namespace, reached over a veth pair, joins it as a worker. Both
# engines share the host's file system, so a host path bind-mounted into a service is the same
# folder on both nodes, as an NFS export is on real servers.
#
# Idempotent: each step first checks whether its result exists, so a second run takes a second.
# teardown.sh undoes it (safe after a partial setup too). Run as root, after .ci/docker-setup.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

# The daemon's last lines, then a one-line error: the lines say why, the error says what failed.
die_with_log() {
    [[ -f "$TN_LOG" ]] && tail -n 20 "$TN_LOG" >&2
    die "$@"
}

preflight() {
    need_root
    local tool
    for tool in ip nsenter unshare dockerd docker; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found: install iproute2, util-linux and docker.io"
    done
    "${D1[@]}" info >/dev/null 2>&1 || die "the first Docker engine does not answer: run .ci/docker-setup.sh first"
    # A kernel without these fails later with obscure errors; name the missing one instead.
    if [[ -r /proc/config.gz ]]; then
        local option
        for option in CONFIG_NET_NS CONFIG_VETH CONFIG_BRIDGE CONFIG_VXLAN; do
            zgrep -qE "^$option=[ym]" /proc/config.gz || die "the kernel lacks $option, which a second swarm node needs"
        done
    fi
    local state
    state="$(swarm_field "${D1[@]}" LocalNodeState)"
    case "$state" in
        inactive) ;;
        active)
            # Only a manager this script made (re-run) is reachable from the namespace.
            [[ "$(swarm_field "${D1[@]}" ControlAvailable)" == true ]] \
                || die "the first engine is a swarm worker; leave that swarm (\`docker swarm leave\`) first"
            [[ "$(swarm_field "${D1[@]}" NodeAddr)" == "$TN_HOST_IP" ]] \
                || die "the first engine is already in a swarm advertising $(swarm_field "${D1[@]}" NodeAddr), which the second engine cannot reach; leave it (\`docker swarm leave --force\`) first"
            ;;
        *) die "the first engine's swarm state is '$state'; expected inactive or active" ;;
    esac
}

make_network() {
    [[ -e "/var/run/netns/$TN_NS" ]] || ip netns add "$TN_NS"
    if ! ip link show "$TN_HOST_IF" >/dev/null 2>&1; then
        ip netns exec "$TN_NS" ip link show eth0 >/dev/null 2>&1 \
            && die "namespace $TN_NS has an eth0 but $TN_HOST_IF is gone: run teardown.sh first"
        ip link add "$TN_HOST_IF" type veth peer name "$TN_HOST_IF-p"
        ip link set "$TN_HOST_IF-p" netns "$TN_NS"
        ip netns exec "$TN_NS" ip link set "$TN_HOST_IF-p" name eth0
    fi
    # Tested on captured output: `grep -q` may close the pipe early, which pipefail reads as a failure.
    [[ "$(ip addr show dev "$TN_HOST_IF")" == *"inet $TN_HOST_IP/"* ]] || ip addr add "$TN_HOST_IP/$TN_PREFIX" dev "$TN_HOST_IF"
    ip link set "$TN_HOST_IF" up
    ip netns exec "$TN_NS" ip link set lo up
    [[ "$(ip netns exec "$TN_NS" ip addr show dev eth0)" == *"inet $TN_NODE_IP/"* ]] \
        || ip netns exec "$TN_NS" ip addr add "$TN_NODE_IP/$TN_PREFIX" dev eth0
    ip netns exec "$TN_NS" ip link set eth0 up
    # No default route, on purpose: a swarm worker tries to pull every service image from a
    # registry before it uses its local copy. Without a route that try fails at once; with a
    # route but no NAT it waits ~20 s for a DNS timeout before every task.
}

start_engine2() {
    if "${D2[@]}" info >/dev/null 2>&1; then
        log "second engine answers on $TN_SOCK"
        return
    fi
    if engine2_pid >/dev/null; then
        die "dockerd $(engine2_pid) (pid file $TN_PIDFILE) runs but does not answer on $TN_SOCK: run teardown.sh"
    fi
    local -a options=(--data-root "$TN_DATA_ROOT" --exec-root "$TN_EXEC_ROOT" --pidfile "$TN_PIDFILE"
                      -H "unix://$TN_SOCK")
    # The storage driver that works for the first engine on this file system works for the second.
    options+=(--storage-driver "$("${D1[@]}" info --format '{{.Driver}}')")
    # Its containers' cgroups apart from the first engine's, so teardown.sh can remove them.
    [[ "$("${D1[@]}" info --format '{{.CgroupDriver}}')" == cgroupfs ]] && options+=(--cgroup-parent /docker2)
    mkdir -p "$TN_DATA_ROOT" "$TN_EXEC_ROOT" "$(dirname "$TN_LOG")"
    # nsenter --net, not `ip netns exec`: the latter also makes a mount namespace with a fresh
    # /sys, which hides the cgroup mounts ("Devices cgroup isn't mounted"). Staying in the host's
    # mount namespace also gives the daemon the host's bind-mount sources. unshare --uts gives the
    # node a name of its own. setsid: the daemon outlives this script.
    setsid nsenter --net="/var/run/netns/$TN_NS" unshare --uts \
        sh -c 'hostname "$0" && exec dockerd "$@"' "$TN_HOSTNAME" "${options[@]}" \
        >"$TN_LOG" 2>&1 </dev/null &
    local daemon=$! deadline=$((SECONDS + TN_TIMEOUT_S))
    until "${D2[@]}" info >/dev/null 2>&1; do
        kill -0 "$daemon" 2>/dev/null || die_with_log "the second dockerd exited at start; see $TN_LOG"
        ((SECONDS < deadline)) || die_with_log "the second dockerd did not answer on $TN_SOCK within ${TN_TIMEOUT_S} s"
        sleep 0.5
    done
    log "second engine answers: $("${D2[@]}" info --format '{{.Name}} {{.ServerVersion}} {{.Driver}}')"
}

copy_images() {
    local image id
    for image in $TN_IMAGES; do
        id="$("${D1[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null)" \
            || die "image $image is not on the first engine: build it first"
        if [[ "$("${D2[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null)" == "$id" ]]; then
            log "image $image already on the second engine"
            continue
        fi
        # No registry to pull from: every layer goes across, uncompressed (about a minute per 3 GB).
        "${D1[@]}" save "$image" | "${D2[@]}" load >/dev/null \
            || die "copying image $image into the second engine failed"
        [[ "$("${D2[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null)" == "$id" ]] \
            || die "image $image arrived in the second engine with another id"
        log "image $image copied"
    done
}

init_swarm() {
    if [[ "$(swarm_field "${D1[@]}" LocalNodeState)" == active ]]; then
        # preflight checked it advertises TN_HOST_IP, an address only our veth carries: ours.
        [[ -f "$TN_STATE" ]] || printf 'made_swarm=1\nhad_gateway=0\n' >"$TN_STATE"
        log "first engine is already the manager at $TN_HOST_IP"
        return
    fi
    local had_gateway=0
    gateway_exists && had_gateway=1
    # Written before the init, so that an interrupted setup is undone too.
    printf 'made_swarm=1\nhad_gateway=%s\n' "$had_gateway" >"$TN_STATE"
    # Listening on the veth address only: the swarm cannot be reached from outside the machine.
    "${D1[@]}" swarm init --advertise-addr "$TN_HOST_IP" --listen-addr "$TN_HOST_IP:2377" \
        --data-path-addr "$TN_HOST_IP" >/dev/null
    log "first engine is now a swarm manager at $TN_HOST_IP:2377"
}

join_swarm() {
    if [[ "$(swarm_field "${D2[@]}" LocalNodeState)" != active ]]; then
        "${D2[@]}" swarm join --token "$("${D1[@]}" swarm join-token -q worker)" \
            --advertise-addr "$TN_NODE_IP" --listen-addr "$TN_NODE_IP:2377" --data-path-addr "$TN_NODE_IP" \
            "$TN_HOST_IP:2377" >/dev/null \
            || die_with_log "the second engine could not join the swarm at $TN_HOST_IP:2377"
    fi
    local node deadline=$((SECONDS + TN_TIMEOUT_S))
    node="$(swarm_field "${D2[@]}" NodeID)"
    until [[ "$("${D1[@]}" node inspect --format '{{.Status.State}} {{.Spec.Availability}}' "$node" 2>/dev/null)" \
             == "ready active" ]]; do
        ((SECONDS < deadline)) || die_with_log "node $TN_HOSTNAME ($node) is not ready after ${TN_TIMEOUT_S} s"
        sleep 0.5
    done
    log "node $TN_HOSTNAME ($node) ready"
}

main() {
    local started=$SECONDS
    timed "preflight" preflight
    timed "network namespace and veth" make_network
    timed "second engine" start_engine2
    timed "images" copy_images
    timed "swarm init" init_swarm
    timed "swarm join" join_swarm
    log "done in $((SECONDS - started)) s; the second engine answers at unix://$TN_SOCK"
}

main "$@"
