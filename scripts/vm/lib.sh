#!/bin/bash
# The steps of the VM stage (scripts/vm/vm-test.sh). Sourced by it for its settings, and run as
# `bash lib.sh STEP ARGS` under `timeout` for each step, so that a step that hangs can be killed
# with everything it started. State that must outlive a step goes to files under $RUN.
set -uo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$VM_DIR/../.." && pwd)
CACHE=${CMTRACE_VM_CACHE:-/var/cache/cmtrace/vm}
RUN=$CACHE/run
BOX_NAME=cmtrace/bookworm-local
BOX_VOLUME_PREFIX=cmtrace-VAGRANTSLASH-bookworm-local_vagrant_box_image
DOMAIN_PREFIX=cmtrace-vmtest-
DAEMON_PIDS=$RUN/daemons-we-started
HOST_TOOLS=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu
    libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base iptables mmdebstrap e2fsprogs fdisk
    rsync openssh-client)

# What vagrant and the Vagrantfile see: the local box, TCG (driver qemu) and a CPU model that TCG
# emulates with the x86-64-v2 instructions (SSE4.2, POPCNT) that the numpy/pyarrow wheels
# require: qemu64 lacks them (pyarrow dies with "invalid opcode" there).
export VAGRANT_CWD=$REPO
export VAGRANT_DOTFILE_PATH=$RUN/vagrant
export VAGRANT_DEFAULT_PROVIDER=libvirt
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
export CMTRACE_VM_BOX=$BOX_NAME
export CMTRACE_VM_DRIVER=${CMTRACE_VM_DRIVER:-qemu}
export CMTRACE_VM_CPU_MODEL=${CMTRACE_VM_CPU_MODEL:-Westmere}
export CMTRACE_VM_NAME=$DOMAIN_PREFIX
export CMTRACE_VM_CONSOLE_LOG=$RUN/console.log
export CMTRACE_VM_BOOT_TIMEOUT=${CMTRACE_VM_BOOT_TIMEOUT:-600}
# The provisioner installs the dev extras too, so the guest's `make demo` set-up has nothing to do.
export CMTRACE_VM_SETUP_ARGS=${CMTRACE_VM_SETUP_ARGS:-}
export LIBVIRT_DEFAULT_URI=qemu:///system

say() { echo "vm-test: $*"; }

# ------------------------------------------------------------------------------ host tools
install_host_tools() {
    local -a missing=()
    local pkg
    for pkg in "${HOST_TOOLS[@]}"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed' ||
            missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    say "apt-get install ${missing[*]}"
    apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
}

# ------------------------------------------------------------------------------ daemons
start_daemon() { # start_daemon NAME: start it unless it runs; remember what we started
    local name=$1 pidfile=/run/$1.pid _
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        return 0
    fi
    mkdir -p /run/libvirt "$RUN"
    rm -f "$pidfile"
    "$name" -d || return 1
    for _ in $(seq 50); do
        [ -s "$pidfile" ] && break
        sleep 0.2
    done
    [ -s "$pidfile" ] || return 1
    echo "$(cat "$pidfile")" >>"$DAEMON_PIDS" # the pid file has no final newline
    say "started $name (pid $(cat "$pidfile"))"
}

start_daemons() {
    start_daemon virtlogd && start_daemon libvirtd || return 1
    local _
    for _ in $(seq 60); do
        virsh version >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    say "libvirtd does not answer on $LIBVIRT_DEFAULT_URI"
    return 1
}

stop_daemons() {
    local pid
    [ -f "$DAEMON_PIDS" ] || return 0
    for pid in $(tac "$DAEMON_PIDS"); do
        kill "$pid" 2>/dev/null && say "stopped daemon pid $pid"
    done
    rm -f "$DAEMON_PIDS"
}

# ------------------------------------------------------------------------------ box
recipe_hash() { # everything that goes into the box: a change rebuilds it
    cat "$VM_DIR/build-box.sh" "$VM_DIR/customize-box.sh" "$VM_DIR/box-packages.txt" \
        "$REPO/pyproject.toml" | sha256sum | cut -c1-16
}

box_file() { echo "$CACHE/box-$(recipe_hash).box"; }

ensure_box() {
    local box
    box=$(box_file)
    if [ -s "$box" ]; then
        say "box cached: $box"
        return 0
    fi
    rm -f "$CACHE"/box-*.box # boxes of older recipes
    say "building $box (no cached box for this recipe)"
    "$VM_DIR/build-box.sh" "$box"
}

add_box() {
    stop_vm # leftovers of an interrupted earlier run would shadow the new box
    vagrant box add --force --name "$BOX_NAME" "$(box_file)" >/dev/null
}

# ------------------------------------------------------------------------------ VM
vagrant_up() {
    rm -f "$CMTRACE_VM_CONSOLE_LOG"
    # The box upload prints a progress line per percent joined by carriage returns: drop them.
    vagrant up --provider=libvirt 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v 'Progress: '
}

stop_vm() { # the VM, its volumes and the box's base volume, by vagrant then by name
    timeout 120 vagrant destroy -f >/dev/null 2>&1 || true
    local domain volume
    for domain in $(virsh list --all --name 2>/dev/null | grep "^$DOMAIN_PREFIX"); do
        virsh destroy "$domain" >/dev/null 2>&1 || true
        virsh undefine "$domain" --remove-all-storage >/dev/null 2>&1 ||
            virsh undefine "$domain" >/dev/null 2>&1 || true
        say "removed leftover domain $domain"
    done
    for volume in $(virsh vol-list default 2>/dev/null | awk 'NR > 2 {print $1}' |
        grep -E "^($DOMAIN_PREFIX|$BOX_VOLUME_PREFIX)"); do
        virsh vol-delete --pool default "$volume" >/dev/null 2>&1 || true
    done
}

stop_networks() { # stop_networks FILE: the libvirt networks not listed in FILE (made by us)
    local net
    for net in $(virsh net-list --all --name 2>/dev/null); do
        if ! grep -qxF "$net" "$1" 2>/dev/null; then
            virsh net-destroy "$net" >/dev/null 2>&1 || true
            virsh net-undefine "$net" >/dev/null 2>&1 || true
        fi
    done
}

guest_kernel() {
    vagrant ssh -c 'uname -r' 2>/dev/null | tr -d '\r' | tail -n 1
}

run_guest() {
    local env="GUEST_TEST_TIMEOUT=${GUEST_TEST_TIMEOUT:-900}"
    [ -z "${GUEST_PYTEST_ARGS:-}" ] || env+=" GUEST_PYTEST_ARGS=$(printf '%q' "$GUEST_PYTEST_ARGS")"
    vagrant ssh -c "sudo $env /vagrant/scripts/vm/guest-run.sh"
}

console_tail() {
    if [ -s "$CMTRACE_VM_CONSOLE_LOG" ]; then
        echo "----- guest console (last 40 lines of $CMTRACE_VM_CONSOLE_LOG) -----"
        tail -n 40 "$CMTRACE_VM_CONSOLE_LOG" | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g'
        echo "-----"
    else
        echo "(no guest console output: the VM did not start or logged nothing)"
    fi
}

# Executed (not sourced): run one step.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    "$@"
fi
