#!/usr/bin/env bash
# Installs Kowalski Exo on this device as systemd services: the node agent, and with
# --coordinator the coordinator too. Running it again changes nothing that is already right;
# --uninstall removes all of it (services, binaries, units, the token file, state, the user).
#
# Usage: scripts/install.sh [--coordinator] [--join TOKEN] [--cluster NAME]
#                           [--coordinator-url URL] [--bin-dir DIR] [--root DIR] [--no-start]
#                           [-- AGENT FLAGS...]
#        scripts/install.sh --uninstall [--root DIR]
#
#   --coordinator        also install the coordinator (system user kowalski-exo, state in
#                        /var/lib/kowalski-exo/coordinator), announced on the LAN
#   --join TOKEN         the join token, kept in /etc/kowalski-exo/node-agent.env (root only);
#                        the agent finds the token's coordinator on the LAN
#   --cluster NAME       with --coordinator: the cluster's name (--cluster-name)
#   --coordinator-url U  the coordinator to join instead of finding it on the LAN
#   --bin-dir DIR        take node-agent and coordinator from DIR [default: build them with
#                        cargo build --release]
#   --root DIR           install into DIR (an image, a throwaway root): no user is made and
#                        nothing is started
#   --no-start           install, but do not enable or start the services
set -euo pipefail

prefix=/usr/local
root=""
bin_dir=""
coordinator=false
uninstall=false
start=true
token=""
cluster=""
coordinator_url=""
agent_flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        --coordinator) coordinator=true ;;
        --uninstall) uninstall=true ;;
        --no-start) start=false ;;
        --join) token="$2"; shift ;;
        --cluster) cluster="$2"; shift ;;
        --coordinator-url) coordinator_url="$2"; shift ;;
        --bin-dir) bin_dir="$2"; shift ;;
        --root) root="${2%/}"; shift ;;
        --) shift; agent_flags=("$@"); break ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

units="$root/etc/systemd/system"
env_dir="$root/etc/kowalski-exo"
state="$root/var/lib/kowalski-exo"
user=kowalski-exo
agent_unit=kowalski-exo-node-agent.service
coordinator_unit=kowalski-exo-coordinator.service
# Only on the running system, never into another root.
live=false
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    live=true
fi
changed_units=false

say() { echo "install.sh: $*"; }

# Puts CONTENT (from stdin) at PATH with MODE, unless it is there already.
put() {
    local path=$1 mode=$2 new
    new=$(mktemp)
    cat >"$new"
    if [ -f "$path" ] && cmp -s "$new" "$path" && [ "$(stat -c %a "$path")" = "${mode#0}" ]; then
        rm -f "$new"
        say "$path unchanged"
        return 1
    fi
    mkdir -p "$(dirname "$path")"
    install -m "$mode" "$new" "$path"
    rm -f "$new"
    say "installed $path"
}

remove() {
    local path=$1
    if [ -e "$path" ]; then
        rm -rf "$path"
        say "removed $path"
    fi
}

if $uninstall; then
    if $live; then
        for unit in $agent_unit $coordinator_unit; do
            if systemctl list-unit-files "$unit" >/dev/null 2>&1; then
                systemctl disable --now "$unit" >/dev/null 2>&1 || true
            fi
        done
    fi
    remove "$units/$agent_unit"
    remove "$units/$coordinator_unit"
    $live && systemctl daemon-reload
    remove "$root$prefix/bin/node-agent"
    remove "$root$prefix/bin/coordinator"
    remove "$env_dir"
    remove "$state"
    remove "$root/var/cache/kowalski-exo"
    if [ -z "$root" ] && id "$user" >/dev/null 2>&1; then
        userdel "$user"
        say "removed the user $user"
    fi
    say "uninstalled"
    exit 0
fi

if [ -z "$bin_dir" ]; then
    cd "$(dirname "$0")/.."
    say "building the release binaries (cargo build --release)"
    cargo build --release --quiet --bin node-agent --bin coordinator
    bin_dir=target/release
fi
for bin in node-agent coordinator; do
    [ -x "$bin_dir/$bin" ] || { echo "install.sh: no $bin in $bin_dir" >&2; exit 2; }
done

binaries_changed=false
for bin in node-agent coordinator; do
    if ! $coordinator && [ "$bin" = coordinator ]; then
        continue
    fi
    if put "$root$prefix/bin/$bin" 0755 <"$bin_dir/$bin"; then
        binaries_changed=true
    fi
done

# The token stays out of the unit (anyone may read units): root alone reads this file.
if [ -n "$token" ]; then
    printf 'KOWALSKI_JOIN_TOKEN=%s\n' "$token" | put "$env_dir/node-agent.env" 0600 || true
fi

if [ -n "$coordinator_url" ]; then
    agent_flags=(--coordinator "$coordinator_url" "${agent_flags[@]}")
elif $coordinator && [ -z "$token" ] && [ ${#agent_flags[@]} -eq 0 ]; then
    # The agent beside a coordinator with no token joins it over loopback.
    agent_flags=(--coordinator http://127.0.0.1:50051)
fi
if "$bin_dir/node-agent" install-service --bin "$prefix/bin/node-agent" -- "${agent_flags[@]}" |
    put "$units/$agent_unit" 0644; then
    changed_units=true
fi

if $coordinator; then
    coordinator_flags=()
    [ -n "$cluster" ] && coordinator_flags=(--cluster-name "$cluster")
    if "$bin_dir/coordinator" install-service --bin "$prefix/bin/coordinator" -- "${coordinator_flags[@]}" |
        put "$units/$coordinator_unit" 0644; then
        changed_units=true
    fi
    if [ -z "$root" ]; then
        if id "$user" >/dev/null 2>&1; then
            say "the user $user exists"
        else
            useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
            say "made the system user $user"
        fi
    fi
fi

if ! $live || ! $start; then
    say "not starting the services (--root, --no-start, or no systemd running)"
    exit 0
fi
$changed_units && systemctl daemon-reload
services=("$agent_unit")
$coordinator && services=("$coordinator_unit" "${services[@]}")
for unit in "${services[@]}"; do
    if ! systemctl is-enabled --quiet "$unit"; then
        systemctl enable --quiet "$unit"
        say "enabled $unit"
    fi
    if ! systemctl is-active --quiet "$unit"; then
        systemctl start "$unit"
        say "started $unit"
    elif $changed_units || $binaries_changed; then
        systemctl restart "$unit"
        say "restarted $unit"
    fi
done
say "done: journalctl -u $agent_unit shows what the agent does"
