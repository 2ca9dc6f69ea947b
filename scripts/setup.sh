#!/bin/bash
# Install what cmtrace needs on a Debian/Ubuntu machine, as root. Idempotent and quick when
# everything is already there. One line per action taken; nothing is printed for what was
# already in place.
#
#   scripts/setup.sh              runtime + test tools + `pip install -e '.[dev]'`
#   scripts/setup.sh --runtime    runtime only (bcc, headers, tracefs, venv, cmtrace link)
#   scripts/setup.sh --uninstall  remove exactly what earlier runs created (see installed.txt)
#
# What it creates is recorded in $CMTRACE_HOME/installed.txt so that --uninstall removes that and
# nothing else: never a venv, link or headers tree that was there before us. Apt packages and
# mounts are left alone by --uninstall (other software may use them).
set -euo pipefail
umask 022 # the venv and links must be readable by every user (sudo cmtrace, cmtrace report)

CMTRACE_HOME=${CMTRACE_HOME:-/opt/cmtrace}
VENV=$CMTRACE_HOME/venv
RECORD=$CMTRACE_HOME/installed.txt
BIN_LINK=/usr/local/bin/cmtrace
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KERNEL=$(uname -r)
MODULES_DIR=/lib/modules/$KERNEL

say() { echo "setup: $*"; }
die() {
    echo "setup: error: $*" >&2
    exit 2
}

record() { # record KIND PATH: remember something we created, once
    mkdir -p "$CMTRACE_HOME"
    grep -qxF "$1 $2" "$RECORD" 2>/dev/null || echo "$1 $2" >>"$RECORD"
}

# ---------------------------------------------------------------- apt packages
RUNTIME_PACKAGES=(python3-bpfcc bpfcc-tools python3-venv python3-pip gcc libc6-dev)
# Tools the tests and `make interpreters` use: strace (benchmark baseline), capsh/setpriv
# (unprivileged doctor tests), readelf, mmdebstrap (sid interpreters), unshare/chroot (namespaces),
# chromium (the HTML report is opened headless) and postgresql (the real-world tests start their
# own cluster; Debian's server binaries, its default cluster is left alone): not in the VM guest,
# which runs neither test and would spend minutes unpacking them under emulation.
TEST_PACKAGES=(strace libcap2-bin util-linux binutils mmdebstrap procps gcc make
    debian-archive-keyring
    tmux)  # tmux: the live view's tests drive a real terminal
[ -n "${CMTRACE_IN_VM:-}" ] || [ -e /etc/cmtrace-vm-guest ] || TEST_PACKAGES+=(chromium postgresql)
# Python services of the real-world tests and benchmarks (FastAPI, uvicorn, asyncpg, gunicorn),
# pinned; installed with the dev extras.
SERVICES_REQUIREMENTS=$REPO/requirements/services.txt
# Not in the VM guest either: it runs neither test, and its offline wheel cache has none of them.
if [ -n "${CMTRACE_IN_VM:-}" ] || [ -e /etc/cmtrace-vm-guest ]; then SERVICES_REQUIREMENTS=; fi

missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed' ||
            echo "$pkg"
    done
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}

# Headers that match the running kernel when the distribution has them, else the generic
# ones (linked below). A kernel that is not the distribution's (this CI's 6.18) has no package.
# Sets HEADERS_PACKAGE (empty when usable headers are already there).
choose_headers_package() {
    HEADERS_PACKAGE=
    if [ -d "$MODULES_DIR/build/include" ] || [ -d "$MODULES_DIR/source/include" ]; then
        return # usable headers already there (package, earlier link or a hand-made tree)
    fi
    local exact=linux-headers-$KERNEL
    if dpkg-query -W -f='${Status}\n' "$exact" 2>/dev/null | grep -q '^install ok installed'; then
        return
    fi
    apt_update_once
    if apt-cache show "$exact" >/dev/null 2>&1; then
        HEADERS_PACKAGE=$exact
    elif grep -qi ubuntu /etc/os-release 2>/dev/null; then
        HEADERS_PACKAGE=linux-headers-generic
    else
        HEADERS_PACKAGE=linux-headers-amd64
    fi
}

install_packages() {
    local -a wanted=("${RUNTIME_PACKAGES[@]}")
    [ "$MODE" = runtime ] || wanted+=("${TEST_PACKAGES[@]}")
    choose_headers_package
    [ -z "$HEADERS_PACKAGE" ] || wanted+=("$HEADERS_PACKAGE")
    local -a missing
    mapfile -t missing < <(missing_packages "${wanted[@]}")
    [ "${#missing[@]}" -gt 0 ] || return 0
    apt_update_once
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- kernel headers link
newest_dir() { # newest_dir GLOB: the highest-versioned existing directory matching GLOB
    # shellcheck disable=SC2086
    ls -d $1 2>/dev/null | sort -V | tail -n 1
}

link_headers() {
    # Only where nothing matches: never replace an existing link or directory.
    if [ -e "$MODULES_DIR/build" ] || [ -L "$MODULES_DIR/build" ]; then
        return
    fi
    local build source
    build=$(newest_dir '/usr/src/linux-headers-*-amd64')
    [ -n "$build" ] || build=$(newest_dir '/usr/src/linux-headers-*-generic')
    [ -n "$build" ] || die "no kernel headers under /usr/src; install linux-headers-amd64"
    mkdir -p "$MODULES_DIR"
    ln -s "$build" "$MODULES_DIR/build"
    record link "$MODULES_DIR/build"
    say "linked $MODULES_DIR/build -> $build (no headers package matches kernel $KERNEL)"
    # Debian splits arch and common headers; bcc looks for both build/ and source/.
    source=$(newest_dir "${build%-*}-common")
    if [ -n "$source" ] && [ ! -e "$MODULES_DIR/source" ] && [ ! -L "$MODULES_DIR/source" ]; then
        ln -s "$source" "$MODULES_DIR/source"
        record link "$MODULES_DIR/source"
        say "linked $MODULES_DIR/source -> $source"
    fi
}

# ---------------------------------------------------------------- tracefs / debugfs / securityfs
mount_tracing() {
    if ! mountpoint -q /sys/kernel/tracing; then
        mount -t tracefs tracefs /sys/kernel/tracing || die "cannot mount tracefs at /sys/kernel/tracing"
        say "mounted tracefs at /sys/kernel/tracing"
    fi
    # Older bcc and tools look under /sys/kernel/debug/tracing; debugfs may be absent: fine.
    if [ -d /sys/kernel/debug ] && ! mountpoint -q /sys/kernel/debug; then
        if mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null; then
            say "mounted debugfs at /sys/kernel/debug"
        fi
    fi
    # securityfs shows the lockdown mode (`cmtrace doctor` reports it).
    if [ -d /sys/kernel/security ] && ! mountpoint -q /sys/kernel/security; then
        if mount -t securityfs securityfs /sys/kernel/security 2>/dev/null; then
            say "mounted securityfs at /sys/kernel/security"
        fi
    fi
}

# ---------------------------------------------------------------- virtualenv + cmtrace
make_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        mkdir -p "$CMTRACE_HOME"
        # Debian's python3: the one bcc is packaged for; --system-site-packages makes it visible.
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
        record venv "$VENV"
        say "created virtualenv $VENV"
    fi
    "$VENV/bin/python" -c 'import bcc' 2>/dev/null ||
        die "bcc is not importable from $VENV (install python3-bpfcc; the venv must use /usr/bin/python3)"
}

# The pip step is the slow one (~10 s): skip it when this repository, with the same
# pyproject.toml and extras, is already installed editable.
pip_stamp() {
    local extras=$1 services=
    [ -z "$extras" ] || [ -z "$SERVICES_REQUIREMENTS" ] ||
        services=$(sha256sum "$SERVICES_REQUIREMENTS" | cut -d' ' -f1)
    printf '%s %s %s%s\n' "$REPO" "$extras" "$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)" \
        "${services:+ services $services}"
}

install_cmtrace() {
    local extras=$1 spec=$REPO stamp_file=$CMTRACE_HOME/pip-stamp.txt
    local -a services=()
    [ -z "$extras" ] || spec="$REPO[$extras]"
    [ -z "$extras" ] || [ -z "$SERVICES_REQUIREMENTS" ] || services=(-r "$SERVICES_REQUIREMENTS")
    local stamp here
    stamp=$(pip_stamp "$extras")
    # -I: not the cwd's cmtrace/ (run from a checkout, `import cmtrace` finds that one, not the
    # installed one, and a venv still pointing at another checkout looked up to date)
    here=$("$VENV/bin/python" -I -c 'import cmtrace, os; print(os.path.dirname(os.path.dirname(os.path.realpath(cmtrace.__file__))))' 2>/dev/null || true)
    if [ "$here" = "$REPO" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] &&
        [ -x "$VENV/bin/cmtrace" ]; then
        return
    fi
    say "pip install -e '$spec' ${services[*]} into $VENV"
    # (pip's complaints about this machine's unused local index entries are noise: dropped)
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$spec" "${services[@]}" \
        2> >(grep -v "^WARNING: Location '" >&2)
    echo "$stamp" >"$stamp_file"
    chmod -R a+rX "$VENV"
}

# The ptrace backend's engine (a helper binary: a C compiler is all it needs), built next to
# its source so every user of this checkout runs the same one; rebuilt when a source changed.
build_ptrace_engine() {
    local engine=$REPO/cmtrace/record/ptrace/cmtrace-ptrace-engine source
    if [ -x "$engine" ]; then
        for source in "$REPO/cmtrace/record/ptrace/engine.c" "$REPO"/probes/{events,pywalk}.h; do
            [ "$engine" -nt "$source" ] || { engine=; break; }
        done
        [ -z "$engine" ] || return 0 # built after every source it reads
    fi
    say "building the ptrace engine"
    "$VENV/bin/python" -m cmtrace.record.ptrace.build >/dev/null
    chmod a+rx "$REPO/cmtrace/record/ptrace/cmtrace-ptrace-engine"
}

link_command() {
    if [ -L "$BIN_LINK" ] && [ "$(readlink "$BIN_LINK")" = "$VENV/bin/cmtrace" ]; then
        return
    fi
    if [ -e "$BIN_LINK" ] || [ -L "$BIN_LINK" ]; then
        say "warning: $BIN_LINK exists and is not ours; left as it is"
        return
    fi
    ln -s "$VENV/bin/cmtrace" "$BIN_LINK"
    record link "$BIN_LINK"
    say "linked $BIN_LINK -> $VENV/bin/cmtrace"
}

# ---------------------------------------------------------------- uninstall
uninstall() {
    if [ ! -f "$RECORD" ]; then
        say "nothing recorded in $RECORD: nothing to remove"
        return
    fi
    local kind path
    # Reverse order: the links into the venv go before the venv.
    tac "$RECORD" | while read -r kind path; do
        case $kind in
        link) if [ -L "$path" ]; then rm -f "$path" && say "removed link $path"; fi ;;
        venv | dir) if [ -d "$path" ]; then rm -rf "$path" && say "removed $path"; fi ;;
        *) say "warning: unknown record '$kind $path' ignored" ;;
        esac
    done
    rm -f "$RECORD" "$CMTRACE_HOME/pip-stamp.txt"
    rmdir "$CMTRACE_HOME" 2>/dev/null && say "removed $CMTRACE_HOME" || true
}

# ---------------------------------------------------------------- main
MODE=full
case ${1:-} in
"") ;;
--runtime) MODE=runtime ;;
--uninstall) MODE=uninstall ;;
-h | --help)
    sed -n '2,12p' "$0"
    exit 0
    ;;
*) die "unknown option '$1' (use --runtime, --uninstall or nothing)" ;;
esac

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
command -v dpkg-query >/dev/null || die "this script supports Debian and Ubuntu (dpkg/apt) only"

if [ "$MODE" = uninstall ]; then
    uninstall
    exit 0
fi

install_packages
link_headers
mount_tracing
make_venv
if [ "$MODE" = runtime ]; then install_cmtrace ""; else install_cmtrace dev; fi
build_ptrace_engine
link_command
