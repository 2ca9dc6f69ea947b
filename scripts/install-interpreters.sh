#!/bin/bash
# Install the CPython builds the attribution tests run on, from Debian packages (no compiling),
# into $PYTHONS (default /opt/cmtrace/pythons), with one wrapper per interpreter in $PYTHONS/bin:
#   python3.9                  Debian bullseye 3.9 (USDT probes that fire), unpacked with dpkg -x;
#                              runs on the host's glibc with its own libraries first.
#   python3.13/3.14/3.15       Debian sid builds in an mmdebstrap chroot (they need sid's libc).
#                              The wrapper runs `chroot $PYTHONS/debchroot /usr/bin/python3.X "$@"`:
#                              chroot changes directory to /, so pass scripts as paths inside
#                              $PYTHONS/debchroot (copy them to $PYTHONS/debchroot/tmp first).
# pyenv builds under /root/.pyenv/versions are used by the tests where present; not installed here,
# but copied (hard links where the filesystem allows: no space, ~1 s) to $PYTHONS/pyenv/3.X.Y so an
# unprivileged user can run them (/root is 0700), with one wrapper each, $PYTHONS/bin/pyenv-3.X:
#   pyenv-3.8 ... pyenv-3.13   the copy's bin/python3.X with its lib/ first on LD_LIBRARY_PATH
#                              (the builds' RUNPATH names /root/.pyenv/..., which nobody may read).
# The sid chroot wrappers need root for chroot; every other wrapper runs as any user (the report
# says which ones `nobody` can run).
# Idempotent: a second run checks each interpreter starts and prints the versions (~1 s).
# Needs root, apt and a Debian mirror (the one in this machine's apt sources).
set -euo pipefail
umask 022

CMTRACE_HOME=${CMTRACE_HOME:-/opt/cmtrace}
PYTHONS=${PYTHONS:-$CMTRACE_HOME/pythons}
RECORD=$CMTRACE_HOME/installed.txt
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PYENV_VERSIONS=${PYENV_VERSIONS:-/root/.pyenv/versions}
MIN_PYENV_MINOR=8 # the walker's oldest layout is 3.8
NOBODY=(setpriv --reuid nobody --regid nogroup --clear-groups --inh-caps=-all --bounding-set=-all)
SID_VERSIONS=(3.13 3.14 3.15)
# The bullseye packages python3.9 needs that bookworm's libc does not provide.
PY39_DEBS=(python3.9-minimal libpython3.9-minimal libpython3.9-stdlib libssl1.1 libffi7 libmpdec3)

say() { echo "interpreters: $*"; }
die() {
    echo "interpreters: error: $*" >&2
    exit 2
}

# The mirror this machine's apt uses: deb822 sources first, then the one-line format.
find_mirror() {
    local mirror
    mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {
        for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null || true)
    echo "${mirror:-http://deb.debian.org/debian}"
}

record_dir() {
    mkdir -p "$CMTRACE_HOME"
    grep -qxF "dir $PYTHONS" "$RECORD" 2>/dev/null || echo "dir $PYTHONS" >>"$RECORD"
}

# apt with a private sources list and state under $PYTHONS/.apt: the system's apt is untouched.
bullseye_apt() {
    local state=$PYTHONS/.apt
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
    cat >"$state/sources.list" <<EOF
deb [signed-by=$KEYRING] $MIRROR bullseye main
deb [signed-by=$KEYRING] ${MIRROR%/debian}/debian-security bullseye-security main
EOF
    apt-get -o Dir::Etc::SourceList="$state/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$state/lists" -o Dir::Cache="$state/cache" \
        -o APT::Sandbox::User=root -o Acquire::Check-Valid-Until=false -qq "$@"
}

install_py39() {
    local dest=$PYTHONS/py39
    if ! "$dest/usr/bin/python3.9" -c pass 2>/dev/null; then
        # Without the wrapper's LD_LIBRARY_PATH the check above fails; try with it.
        if [ -x "$PYTHONS/bin/python3.9" ] && "$PYTHONS/bin/python3.9" -c pass 2>/dev/null; then
            return
        fi
        say "installing Debian bullseye python3.9 into $dest"
        local debs=$PYTHONS/.debs
        rm -rf "$debs" "$dest.tmp"
        mkdir -p "$debs" "$dest.tmp"
        bullseye_apt update
        (cd "$debs" && bullseye_apt download "${PY39_DEBS[@]}")
        local deb
        for deb in "$debs"/*.deb; do dpkg -x "$deb" "$dest.tmp"; done
        rm -rf "$dest" "$debs"
        mv "$dest.tmp" "$dest"
    fi
    cat >"$PYTHONS/bin/python3.9" <<EOF
#!/bin/sh
LD_LIBRARY_PATH=$dest/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $dest/usr/bin/python3.9 "\$@"
EOF
    chmod 755 "$PYTHONS/bin/python3.9"
}

sid_ready() {
    local v
    for v in "${SID_VERSIONS[@]}"; do
        chroot "$PYTHONS/debchroot" "/usr/bin/python$v" -c pass 2>/dev/null || return 1
    done
}

install_sid() {
    local dest=$PYTHONS/debchroot
    if ! sid_ready; then
        command -v mmdebstrap >/dev/null ||
            die "mmdebstrap is missing: run scripts/setup.sh (or apt-get install mmdebstrap)"
        say "building a Debian sid chroot with python${SID_VERSIONS[*]} into $dest"
        local -a includes=() mm
        local v
        for v in "${SID_VERSIONS[@]}"; do includes+=("python$v"); done
        mm=(mmdebstrap --quiet --variant=essential
            --aptopt='Acquire::Check-Valid-Until "false"'
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
            --dpkgopt='path-exclude=/usr/share/locale/*'
            "--include=$(
                IFS=,
                echo "${includes[*]}"
            )")
        rm -rf "$dest.tmp"
        # sid alone first; trixie as a second source in case sid has dropped an older minor.
        if ! "${mm[@]}" sid "$dest.tmp" "deb $MIRROR sid main"; then
            rm -rf "$dest.tmp"
            "${mm[@]}" sid "$dest.tmp" "deb $MIRROR sid main" "deb $MIRROR trixie main"
        fi
        rm -rf "$dest"
        mv "$dest.tmp" "$dest"
    fi
    for v in "${SID_VERSIONS[@]}"; do
        printf '#!/bin/sh\nexec chroot %s /usr/bin/python%s "$@"\n' "$dest" "$v" >"$PYTHONS/bin/python$v"
        chmod 755 "$PYTHONS/bin/python$v"
    done
}

# Copy one pyenv build outside /root (once: a copy that exists is kept) and write its wrapper.
copy_pyenv_build() {
    local src=$1 version minor dest
    version=$(basename "$src")
    minor=${version%.*}
    dest=$PYTHONS/pyenv/$version
    if [ ! -x "$dest/bin/python$minor" ]; then
        say "copying pyenv $version to $dest"
        rm -rf "$dest.tmp"
        mkdir -p "$PYTHONS/pyenv"
        cp -al "$src" "$dest.tmp" 2>/dev/null || { rm -rf "$dest.tmp" && cp -a "$src" "$dest.tmp"; }
        mv "$dest.tmp" "$dest"
    fi
    cat >"$PYTHONS/bin/pyenv-$minor" <<EOF
#!/bin/sh
LD_LIBRARY_PATH=$dest/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $dest/bin/python$minor "\$@"
EOF
    chmod 755 "$PYTHONS/bin/pyenv-$minor"
}

install_pyenv_copies() {
    [ -d "$PYENV_VERSIONS" ] || return 0
    local src minor
    for src in "$PYENV_VERSIONS"/3.*; do
        minor=$(basename "$src" | cut -d. -f2)
        [ "$minor" -ge "$MIN_PYENV_MINOR" ] 2>/dev/null || continue
        [ -x "$src/bin/python3" ] || continue
        copy_pyenv_build "$src"
    done
}

# Which wrappers an unprivileged user can run (the chroot ones cannot: chroot needs root).
report_unprivileged() {
    command -v setpriv >/dev/null || return 0
    local wrapper runs=() cannot=()
    for wrapper in "$PYTHONS"/bin/*; do
        if (cd / && "${NOBODY[@]}" "$wrapper" -c pass) >/dev/null 2>&1; then
            runs+=("$(basename "$wrapper")")
        else
            cannot+=("$(basename "$wrapper")")
        fi
    done
    say "runnable by nobody: ${runs[*]:-none}; root only: ${cannot[*]:-none}"
}

report() {
    local wrapper version
    for wrapper in "$PYTHONS"/bin/python3.* "$PYTHONS"/bin/pyenv-3.*; do
        [ -e "$wrapper" ] || continue
        version=$("$wrapper" -c 'import sys; print(sys.version.split()[0])' 2>&1) ||
            die "$wrapper does not start: $version"
        say "$(basename "$wrapper") -> $version ($wrapper)"
    done
    report_unprivileged
    if [ -d /root/.pyenv/versions ]; then
        say "pyenv builds (used where present): $(ls /root/.pyenv/versions | tr '\n' ' ')"
    fi
}

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
MIRROR=${MIRROR:-$(find_mirror)}
# Recorded for `make uninstall` only if we create it: a directory that was there stays.
[ -d "$PYTHONS" ] || { mkdir -p "$PYTHONS" && record_dir; }
mkdir -p "$PYTHONS/bin"
install_py39
install_sid
install_pyenv_copies
report
