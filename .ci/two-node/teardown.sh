#!/usr/bin/env bash
# Undo setup.sh: the second engine leaves the swarm and stops; the first engine leaves the swarm
# only if setup.sh made it (see $TN_STATE), otherwise only the second node is removed from it;
# the namespace, the veth pair, the second engine's exec root, socket, pid file, cgroups, log and
# data root go. Idempotent: safe after a failed or partial setup, or twice.
#
# The data root holds the copied images (gigabytes, about 100 s to delete). It is renamed at
# once and deleted in the background at low priority, once no daemon uses it; TN_KEEP_DATA=1
# keeps it instead, so a later setup.sh skips the copy. TN_KEEP_LOG=1 keeps the daemon's log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"
TN_KEEP_DATA="${TN_KEEP_DATA:-0}"
TN_KEEP_LOG="${TN_KEEP_LOG:-0}"
TRASH_PREFIX="$TN_DATA_ROOT.deleting"
failures=0
# Teardown goes on after a failed step, so that one problem does not leave everything else behind.
warn() { printf '[two-node] warning: %s\n' "$*" >&2; failures=$((failures + 1)); }

leave_engine2() {
    if "${D2[@]}" info >/dev/null 2>&1 && [[ "$(swarm_field "${D2[@]}" LocalNodeState)" != inactive ]]; then
        "${D2[@]}" swarm leave --force >/dev/null || warn "the second engine could not leave the swarm"
    fi
}

stop_engine2() {
    local pid
    pid="$(engine2_pid)" || { log "second engine not running"; return 0; }
    kill -TERM "$pid"
    local deadline=$((SECONDS + TN_TIMEOUT_S))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            warn "dockerd $pid did not stop within ${TN_TIMEOUT_S} s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
    # Its containerd and shims normally stop with it. Any left name our exec root, so they are ours.
    local leftover
    for leftover in $(pgrep -f -- "$TN_EXEC_ROOT/containerd" || true); do
        warn "killing leftover process $leftover: $(tr '\0' ' ' <"/proc/$leftover/cmdline" 2>/dev/null)"
        kill -KILL "$leftover" 2>/dev/null || true
    done
}

leave_engine1() {
    local made_swarm=0 had_gateway=1
    if [[ -f "$TN_STATE" ]]; then
        made_swarm="$(awk -F= '$1 == "made_swarm" {print $2}' "$TN_STATE")"
        had_gateway="$(awk -F= '$1 == "had_gateway" {print $2}' "$TN_STATE")"
    elif [[ "$(swarm_field "${D1[@]}" NodeAddr)" == "$TN_HOST_IP" ]]; then
        made_swarm=1 had_gateway=0  # the state file is lost, but only our veth carries that address
    fi
    if ! "${D1[@]}" info >/dev/null 2>&1; then
        warn "the first engine does not answer: its swarm state is left as it is"
        return
    fi
    if [[ "$made_swarm" == 1 ]]; then
        if [[ "$(swarm_field "${D1[@]}" LocalNodeState)" != inactive ]]; then
            "${D1[@]}" swarm leave --force >/dev/null || warn "the first engine could not leave the swarm"
        fi
        if [[ "$had_gateway" != 1 ]] && gateway_exists; then
            "${D1[@]}" network rm "$GATEWAY_NETWORK" >/dev/null || warn "could not remove network $GATEWAY_NETWORK"
        fi
    elif [[ "$(swarm_field "${D1[@]}" ControlAvailable)" == true ]]; then
        # A swarm that was there before setup.sh: only our node leaves it.
        local node
        for node in $("${D1[@]}" node ls -q --filter "name=$TN_HOSTNAME" 2>/dev/null || true); do
            if [[ "$("${D1[@]}" node inspect --format '{{.Description.Hostname}}' "$node")" == "$TN_HOSTNAME" ]]; then
                "${D1[@]}" node rm --force "$node" >/dev/null || warn "could not remove node $node from the swarm"
            fi
        done
    fi
    rm -f "$TN_STATE"
}

remove_network() {
    local exec_root data_root mount
    # /var/run is usually a link to /run, and /proc/mounts names the resolved paths.
    exec_root="$(realpath -m "$TN_EXEC_ROOT")"
    data_root="$(realpath -m "$TN_DATA_ROOT")"
    # What the stopped engine may have left mounted: its containers' network namespaces and file systems.
    for mount in $(awk -v a="$exec_root/" -v b="$data_root/" \
                   'index($2 "/", a) == 1 || index($2 "/", b) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$mount" || warn "could not unmount $mount"
    done
    # Deleting the host end removes both ends at once; `ip netns del` alone frees them only later.
    if ip link show "$TN_HOST_IF" >/dev/null 2>&1; then
        ip link del "$TN_HOST_IF" || warn "could not delete $TN_HOST_IF"
    fi
    if [[ -e "/var/run/netns/$TN_NS" ]]; then
        ip netns del "$TN_NS" || warn "could not delete network namespace $TN_NS"
    fi
}

remove_files() {
    rm -rf --one-file-system "$TN_EXEC_ROOT" "$TN_SOCK" "$TN_PIDFILE"
    [[ "$TN_KEEP_LOG" == 1 ]] || rm -f "$TN_LOG"
    local cgroup
    for cgroup in /sys/fs/cgroup/*/docker2 /sys/fs/cgroup/docker2; do
        if [[ -d "$cgroup" ]]; then
            find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || warn "could not remove cgroup $cgroup"
        fi
    done
}

delete_data_root() {
    if [[ "$TN_KEEP_DATA" == 1 ]]; then
        log "keeping $TN_DATA_ROOT (TN_KEEP_DATA=1)"
        return
    fi
    if engine2_pid >/dev/null; then
        warn "dockerd $(engine2_pid) still runs: $TN_DATA_ROOT is kept"
        return
    fi
    # A rename on the same file system is instant, and frees the path for the next setup.sh.
    [[ -e "$TN_DATA_ROOT" ]] && mv -T "$TN_DATA_ROOT" "$TRASH_PREFIX.$$"
    local -a trash
    shopt -s nullglob
    trash=("$TRASH_PREFIX".*)  # this run's, and any an interrupted deletion left
    shopt -u nullglob
    ((${#trash[@]})) || return 0
    local -a low_priority=(nice -n 19)
    command -v ionice >/dev/null 2>&1 && low_priority+=(ionice -c 3)
    # Detached, and without this script's output: whoever waits for teardown.sh does not wait for it.
    setsid "${low_priority[@]}" rm -rf --one-file-system -- "${trash[@]}" >/dev/null 2>&1 </dev/null &
    log "deleting ${trash[*]} in the background (pid $!)"
}

check_engine1() {
    "${D1[@]}" info >/dev/null 2>&1 || { warn "the first engine does not answer"; return; }
    log "first engine: swarm $(swarm_field "${D1[@]}" LocalNodeState)"
}

main() {
    need_root
    local started=$SECONDS
    timed "second engine leaves the swarm" leave_engine2
    timed "second engine stops" stop_engine2
    timed "first engine's swarm" leave_engine1
    timed "namespace and veth" remove_network
    timed "files" remove_files
    timed "data root" delete_data_root
    check_engine1
    ((failures == 0)) || die "teardown finished with $failures warning(s), above"
    log "done in $((SECONDS - started)) s"
}

main "$@"
