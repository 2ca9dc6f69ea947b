#!/bin/bash
# The VM stage of `make test` (and `make vm-test` alone): boot the project's Vagrantfile on a
# stock Debian kernel and run the demo and the chosen tests inside it.
#
#  host-tools  vagrant, vagrant-libvirt, libvirt, qemu, mmdebstrap (apt, when missing)
#  daemons     virtlogd + libvirtd started by hand (no systemd here), stopped at the end
#  box         Debian bookworm box built from Debian packages (build-box.sh), cached under
#              $CMTRACE_VM_CACHE and rebuilt when its recipe (scripts/vm/*, pyproject) changes
#  box-add     added to Vagrant as cmtrace/bookworm-local
#  up          `vagrant up` with overrides: local box, libvirt driver qemu (software emulation:
#              this machine's /dev/kvm cannot run a stock kernel), CPU Westmere; one retry
#  guest       scripts/vm/guest-run.sh inside the guest: set-up, `make demo`, tests
#  destroy     `vagrant destroy`; then cleanup: the box, its pool volume, the networks and
#              daemons this run started
#
# Every step is time-bounded; cleanup runs on any exit (failure, Ctrl-C, TERM). A failure names
# its step and prints the guest console's tail. Environment:
#   CMTRACE_VM=skip         skip the stage (says so)
#   CMTRACE_VM_CACHE        box cache directory (default /var/cache/cmtrace/vm)
#   CMTRACE_VM_KEEP=1       leave the VM running at the end, for debugging; `vm-test.sh --clean`
#                           (or the next run) removes it
#   GUEST_TEST_TIMEOUT      seconds for the guest's pytest run (default 900)
#   CMTRACE_VM_BUDGET       seconds for the whole stage (default 1800); no step runs past it
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STAGE_START=$(date +%s)
# The whole stage's time limit: with every step bounded, `make test` stays within CI's limit even
# when something hangs (measured: 16 min with a cached box, 19 min building it).
STAGE_BUDGET=${CMTRACE_VM_BUDGET:-1800}
TIMINGS=()
VM_CREATED=0
GUEST_KERNEL=unknown
CURRENT_STEP=preflight
NETWORKS_BEFORE=$RUN/networks-before

print_timings() {
    local line
    say "timings:"
    for line in "${TIMINGS[@]}"; do echo "  $line"; done
    echo "  total      $(printf '%5d' $(($(date +%s) - STAGE_START))) s"
}

fail() { # fail MESSAGE: name the step, show the console, stop (cleanup runs from the trap)
    say "FAILED at step '$CURRENT_STEP': $*"
    console_tail
    exit 1
}

# step NAME LIMIT FUNCTION ARGS...: run a lib.sh step in its own process under `timeout`, bounded
# by its own limit and by what is left of the whole stage's budget
step() {
    local name=$1 limit=$2 start rc left
    shift 2
    CURRENT_STEP=$name
    start=$(date +%s)
    left=$((STAGE_START + STAGE_BUDGET - start))
    [ "$left" -gt 30 ] || fail "the stage's budget of $STAGE_BUDGET s is used up"
    [ "$limit" -le "$left" ] || limit=$left
    say "step $name (limit ${limit} s)"
    # 9>&-: the lock descriptor must not leak into daemons a step starts (they would hold it)
    timeout --kill-after=30 "$limit" bash "$VM_DIR/lib.sh" "$@" 9>&-
    rc=$?
    TIMINGS+=("$(printf '%-10s %5d s  exit %d' "$name" $(($(date +%s) - start)) "$rc")")
    [ "$rc" != 124 ] || say "step $name timed out after $limit s"
    return "$rc"
}

skip() {
    say "SKIPPED: $*"
    exit 0
}

remove_everything() { # the VM, its volumes, the box, the networks and daemons we started
    stop_vm
    [ ! -f "$NETWORKS_BEFORE" ] || stop_networks "$NETWORKS_BEFORE"
    timeout 60 vagrant box remove --force "$BOX_NAME" >/dev/null 2>&1 || true
    stop_daemons
    rm -f "$NETWORKS_BEFORE"
}

cleanup() {
    local rc=$? start
    trap - EXIT INT TERM
    start=$(date +%s)
    if [ "${CMTRACE_VM_KEEP:-0}" = 1 ] && [ "$VM_CREATED" = 1 ]; then
        say "CMTRACE_VM_KEEP=1: VM left running; VAGRANT_CWD=$VAGRANT_CWD VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH"
        say "remove it with: scripts/vm/vm-test.sh --clean"
    else
        remove_everything
    fi
    TIMINGS+=("$(printf '%-10s %5d s' cleanup $(($(date +%s) - start)))")
    print_timings
    if [ "$rc" = 0 ]; then
        say "PASSED on guest kernel $GUEST_KERNEL"
    else
        say "FAILED (exit $rc) at step '$CURRENT_STEP'; guest kernel $GUEST_KERNEL"
    fi
    exit "$rc"
}

boot_with_one_retry() {
    VM_CREATED=1
    step up 900 vagrant_up && return 0
    say "boot failed; console tail, then one retry"
    console_tail
    stop_vm
    step up-retry 900 vagrant_up || fail "vagrant up failed twice"
}

# ------------------------------------------------------------------------------ main
[ "${CMTRACE_VM:-}" != skip ] || skip "CMTRACE_VM=skip"
if [ -n "${CMTRACE_IN_VM:-}" ] || [ -e /etc/cmtrace-vm-guest ]; then
    skip "running inside the VM guest: no nested VM"
fi
[ "$(id -u)" = 0 ] || {
    say "run as root (sudo make vm-test)"
    exit 2
}
[ "$(uname -m)" = x86_64 ] || skip "the box is built for x86_64; this machine is $(uname -m)"
[ -e /dev/loop-control ] || ls "$CACHE"/box-*.box >/dev/null 2>&1 ||
    skip "no loop devices (/dev/loop-control) to build the box, and no cached box in $CACHE"

mkdir -p "$RUN"
if [ "${1:-}" = --clean ]; then # remove what a CMTRACE_VM_KEEP=1 run left
    remove_everything
    exit 0
fi
# One VM stage at a time on a machine: they share libvirt, the box name and the cache.
exec 9>"$CACHE/lock"
if ! flock -n 9; then
    say "another VM stage is running on this machine; waiting for it (up to 25 min)"
    flock -w 1500 9 || {
        say "FAILED: another VM stage held $CACHE/lock for 25 min"
        exit 1
    }
fi
if [ -f "$DAEMON_PIDS" ]; then # what a run with CMTRACE_VM_KEEP=1 left behind
    say "removing the VM, box, networks and daemons an earlier run kept"
    remove_everything
fi
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

step host-tools 900 install_host_tools || fail "could not install ${HOST_TOOLS[*]}"
step daemons 120 start_daemons || fail "could not start virtlogd/libvirtd"
virsh net-list --all --name >"$NETWORKS_BEFORE" 2>/dev/null
step box 1200 ensure_box || fail "box build failed (see the build-box lines above)"
step box-add 300 add_box || fail "vagrant box add $(box_file) failed"
boot_with_one_retry
GUEST_KERNEL=$(timeout 60 bash "$VM_DIR/lib.sh" guest_kernel 9>&-)
say "guest kernel: ${GUEST_KERNEL:-unknown}"
step guest "$((${GUEST_TEST_TIMEOUT:-900} + 600))" run_guest ||
    fail "the set-up, demo or tests failed inside the guest (see the guest lines above)"
if [ "${CMTRACE_VM_KEEP:-0}" != 1 ]; then
    step destroy 180 vagrant destroy -f || fail "vagrant destroy failed"
fi
