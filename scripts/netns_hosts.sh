#!/usr/bin/env bash
# Simulated hosts on this machine for multi-host tests: Linux network namespaces, each with its own
# address, an sshd and a node-local folder, joined by a bridge in the root namespace.
#
# Usage (as root):
#   scripts/netns_hosts.sh deps              install openssh-server and iproute2 with apt-get
#                                            (nothing to do when sshd and ip are already there)
#   scripts/netns_hosts.sh up STATE_DIR [N]  build N hosts (default 2); STATE_DIR must be empty
#   scripts/netns_hosts.sh down STATE_DIR    stop every process in the hosts and remove them
#
# Layout (PREFIX = $DHO2_NETNS_PREFIX, default dho2mh; SUBNET = $DHO2_NETNS_SUBNET, default
# 10.213.0): a bridge PREFIX with SUBNET.1/24 in the root namespace; host i (1..N) is the network
# namespace PREFIX-i, linked to the bridge by a veth pair whose inner end is also called PREFIX
# (every host and the launcher share one interface name, as on a real cluster where Horovod picks
# the common interface) and holds SUBNET.(i+1)/24; loopback is up. No route leaves the subnet
# and nothing is forwarded: traffic flows only between the hosts and the root namespace.
#
# Each host runs /usr/sbin/sshd on port 22 of its address with a throwaway host key, accepting a
# throwaway root key pair, all under STATE_DIR (~/.ssh is never read or written). sshd starts in
# the host's own mount namespace, where STATE_DIR/host<i>/local is bind-mounted on
# STATE_DIR/local: a process started over ssh sees its host's node-local folder at that common
# path (non-shared storage), while the rest of the filesystem (checkout, venv) is shared.
#
# `up` writes STATE_DIR/hosts.env (HOSTS="SUBNET.2 SUBNET.3 ...", NIC, SSH_IDENTITY_FILE,
# SSH_BIN_DIR, LOCAL_DIR) and STATE_DIR/bin/ssh, an ssh that uses STATE_DIR/ssh_config: put
# STATE_DIR/bin first on PATH and `ssh SUBNET.2 hostname`, horovodrun -H SUBNET.2:1,SUBNET.3:1
# and jobs/examples/multi_host.sh work without any other ssh set-up.
set -euo pipefail

PREFIX="${DHO2_NETNS_PREFIX:-dho2mh}"
SUBNET="${DHO2_NETNS_SUBNET:-10.213.0}"
SSHD=/usr/sbin/sshd

die() { echo "netns_hosts.sh: error: $*" >&2; exit 1; }

need_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (network namespaces, bridges and sshd need it)."
}

cmd_deps() {
    need_root
    if [[ -x "$SSHD" ]] && command -v ip >/dev/null && command -v ssh-keygen >/dev/null; then
        echo "[netns_hosts] openssh-server and iproute2 already installed"
        return
    fi
    echo "[netns_hosts] installing openssh-server and iproute2 (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends openssh-server openssh-client iproute2
}

# Every namespace of ours (PREFIX-<n>), whatever N the last `up` used.
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}-[0-9]+$" || true
}

# Root-side ends of our veth pairs (PREFIX-v<n>).
our_veths() {
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
        | grep -E "^${PREFIX}-v[0-9]+$" || true
}

cmd_down() {
    need_root
    local state="${1:-}" ns pids link tries=0
    for ns in $(our_namespaces); do
        # sshd, the sessions it started and any worker left behind: all live in the namespace.
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        if [[ -n "$pids" ]]; then
            kill -9 $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
    # The kernel dismantles a deleted namespace (and the veth pairs in it) asynchronously:
    # delete the root-side ends now and wait until they are gone, so `up` can reuse the names.
    for link in $(our_veths); do
        ip link del "$link" 2>/dev/null || true
    done
    while [[ -n "$(our_veths)" ]]; do
        tries=$((tries + 1))
        [[ $tries -lt 100 ]] || die "could not remove the links $(our_veths | tr '\n' ' ')"
        sleep 0.1
    done
    if ip link show "$PREFIX" >/dev/null 2>&1; then
        ip link del "$PREFIX"
    fi
    if [[ -n "$state" && -f "$state/hosts.env" ]]; then
        rm -f "$state/hosts.env"
    fi
}

wait_for_sshd() {
    local ns="$1" addr="$2" tries=0
    until ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$addr/22" 2>/dev/null; do
        tries=$((tries + 1))
        [[ $tries -lt 100 ]] || die "sshd of $ns ($addr) did not start; see its log in the state folder"
        sleep 0.1
    done
}

cmd_up() {
    need_root
    local state="${1:-}" n="${2:-2}" i ns addr host_dir
    [[ -n "$state" ]] || die "up needs a STATE_DIR"
    [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 200 ]] || die "N must be 1..200. Received: $n"
    [[ -x "$SSHD" ]] || die "$SSHD not found: run 'bash scripts/netns_hosts.sh deps' first"
    command -v ip >/dev/null || die "ip (iproute2) not found: run 'bash scripts/netns_hosts.sh deps'"
    mkdir -p "$state"
    state="$(cd "$state" && pwd)"
    [[ -z "$(ls -A "$state")" ]] || die "STATE_DIR must be empty. Received: $state"
    cmd_down ""   # leftovers of a run that was killed before its own `down`
    chmod 700 "$state"

    # Network: the bridge (launcher side), then one namespace per host.
    ip link add "$PREFIX" type bridge
    ip addr add "$SUBNET.1/24" dev "$PREFIX"
    ip link set "$PREFIX" up
    for i in $(seq 1 "$n"); do
        ns="$PREFIX-$i"
        ip netns add "$ns"
        ip link add "$PREFIX-v$i" type veth peer name "$PREFIX" netns "$ns"
        ip link set "$PREFIX-v$i" master "$PREFIX" up
        ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev "$PREFIX"
        ip -n "$ns" link set "$PREFIX" up
        ip -n "$ns" link set lo up
    done

    # Throwaway keys: one host key for every sshd, one root key pair for the client.
    ssh-keygen -q -t ed25519 -N '' -C dho2-netns-host -f "$state/host_key"
    ssh-keygen -q -t ed25519 -N '' -C dho2-netns-client -f "$state/id_ed25519"
    cp "$state/id_ed25519.pub" "$state/authorized_keys"
    : > "$state/known_hosts"
    mkdir -p "$state/bin" "$state/local"
    cat > "$state/ssh_config" <<EOF
Host $SUBNET.*
    User root
    IdentityFile $state/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $state/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
EOF
    cat > "$state/bin/ssh" <<EOF
#!/bin/sh
# ssh to the simulated hosts of $state with their throwaway keys (never ~/.ssh).
exec /usr/bin/ssh -F "$state/ssh_config" "\$@"
EOF
    chmod 755 "$state/bin/ssh"
    mkdir -p /run/sshd && chmod 755 /run/sshd   # sshd's privilege-separation folder

    printf '127.0.0.1 localhost\n::1 localhost\n' > "$state/etc_hosts"
    for i in $(seq 1 "$n"); do
        echo "$SUBNET.$((i + 1)) $PREFIX-$i" >> "$state/etc_hosts"
    done
    local hosts=()
    for i in $(seq 1 "$n"); do
        ns="$PREFIX-$i"
        addr="$SUBNET.$((i + 1))"
        host_dir="$state/host$i"
        mkdir -p "$host_dir/local"
        echo "$addr $(cut -d' ' -f1,2 "$state/host_key.pub")" >> "$state/known_hosts"
        cat > "$host_dir/sshd_config" <<EOF
ListenAddress $addr
Port 22
HostKey $state/host_key
PidFile $host_dir/sshd.pid
AuthorizedKeysFile $state/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 200
MaxSessions 200
EOF
        # `ip netns exec` gives the command its own mount namespace and `unshare --uts` its own
        # host name: the bind mounts (node-local folder, an /etc/hosts that resolves every host
        # name to its address) and the name are seen by this sshd and everything it starts, and
        # nowhere else. Gloo needs the name: Horovod 0.28.1 creates the contexts of its process
        # sets on the address the host name resolves to, whatever --network-interface says.
        ip netns exec "$ns" unshare --uts sh -c "hostname '$ns' && \
            mount --bind '$state/etc_hosts' /etc/hosts && \
            mount --bind '$host_dir/local' '$state/local' && \
            exec $SSHD -f '$host_dir/sshd_config' -E '$host_dir/sshd.log'"
        wait_for_sshd "$ns" "$addr"
        hosts+=("$addr")
    done
    cat > "$state/hosts.env" <<EOF
HOSTS="${hosts[*]}"
NIC=$PREFIX
NAMESPACE_PREFIX=$PREFIX
SSH_IDENTITY_FILE=$state/id_ed25519
SSH_BIN_DIR=$state/bin
LOCAL_DIR=$state/local
EOF
    echo "[netns_hosts] up: ${hosts[*]} (interface $PREFIX, state $state)"
}

case "${1:-}" in
    deps) cmd_deps ;;
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    *) echo "usage: $0 deps | up STATE_DIR [N] | down STATE_DIR" >&2; exit 2 ;;
esac
