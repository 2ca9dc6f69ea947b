#!/bin/bash
# Build the VM stage's Vagrant box (libvirt, qcow2) from Debian bookworm packages, with no box
# download: mmdebstrap into an ext4 partition of a raw disk on a loop device, GRUB on its MBR,
# then qemu-img to qcow2 and an uncompressed box tar (gzip would cost ~40 s and save nothing here).
#
#   scripts/vm/build-box.sh OUT.box     (root; ~3 min; needs mmdebstrap, qemu-utils, vagrant)
#
# The box has bcc, matching kernel headers, the test tools and cmtrace's Python dependencies
# (in /opt/cmtrace/venv, from a wheelhouse made here with pip) already installed, so the guest
# needs neither apt nor PyPI. Every mount and loop device is released on exit, even on failure.
set -euo pipefail
OUT=${1:?usage: build-box.sh OUT.box}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DISK_GB=${CMTRACE_BOX_DISK_GB:-10}
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/cmtrace-box.XXXXXX")
MNT=$WORK/mnt
LOOP=
MADE_NODE= # the partition device node we created with mknod (removed at exit)

say() { echo "build-box: $*"; }

cleanup() {
    local rc=$?
    # Reverse order of setup; each step tolerates "not mounted / already gone".
    for m in "$MNT/sys" "$MNT/proc" "$MNT/dev/pts" "$MNT/dev" "$MNT"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m"
    done
    if [ -n "$LOOP" ]; then
        losetup -d "$LOOP" 2>/dev/null || true
    fi
    [ -z "$MADE_NODE" ] || rm -f "$MADE_NODE"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

debian_mirror() {
    local mirror
    mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {
        for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null || true)
    echo "${mirror:-http://deb.debian.org/debian}"
}

# Wheels of cmtrace's dependencies (with dev extras) for the guest's Python 3.11, fetched by the
# host's pip (the guest is the same Debian bookworm Python, so the same wheels fit).
make_wheelhouse() {
    local pip=/opt/cmtrace/venv/bin/pip
    [ -x "$pip" ] || pip="/usr/bin/python3 -m pip"
    local -a requirements
    mapfile -t requirements < <(/usr/bin/python3 - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
build = tomllib.load(open(sys.argv[1], "rb")).get("build-system", {}).get("requires", [])
for req in [*build, "wheel", *project["project"]["dependencies"],
            *project["project"].get("optional-dependencies", {}).get("dev", [])]:
    print(req)
PY
    )
    mkdir -p "$WORK/wheels"
    # shellcheck disable=SC2086
    $pip download -q --only-binary=:all: --dest "$WORK/wheels" "${requirements[@]}" 2>&1 |
        grep -v "^WARNING: Location '" || true
    [ -n "$(ls "$WORK/wheels")" ] || {
        echo "build-box: pip download fetched no wheels" >&2
        exit 1
    }
    say "wheelhouse: $(ls "$WORK/wheels" | wc -l) wheels, $(du -sh "$WORK/wheels" | cut -f1)"
}

# A raw disk with one bootable partition, attached to a loop device. There is no udev here, so
# the partition's device node may not appear: make it from /proc/partitions.
make_disk() {
    truncate -s "${DISK_GB}G" "$WORK/disk.raw"
    echo 'type=83, bootable' | sfdisk -q "$WORK/disk.raw"
    LOOP=$(losetup --find --partscan --show "$WORK/disk.raw")
    local part=${LOOP}p1 name=${LOOP#/dev/}p1 majmin
    # --partscan alone does not always make the kernel see the partition here; partx does.
    grep -qw "$name" /proc/partitions || partx --add "$LOOP" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        [ -b "$part" ] && break
        majmin=$(awk -v n="$name" '$4 == n {print $1 " " $2}' /proc/partitions)
        if [ -n "$majmin" ]; then
            # shellcheck disable=SC2086
            mknod "$part" b $majmin
            MADE_NODE=$part
            break
        fi
        sleep 0.5
    done
    [ -b "$part" ] || {
        echo "build-box: partition $part of $LOOP did not appear" >&2
        exit 1
    }
    mkfs.ext4 -q -L root "$part"
    mkdir -p "$MNT"
    mount "$part" "$MNT"
    say "disk: ${DISK_GB} GiB raw on $LOOP"
}

install_system() {
    local mirror security packages
    mirror=$(debian_mirror)
    security=${mirror%/debian}/debian-security
    packages=$(grep -v '^#' "$HERE/box-packages.txt" | grep -v '^$' | paste -sd, -)
    rmdir "$MNT/lost+found" # mmdebstrap wants an empty target
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook="$HERE/customize-box.sh \"\$1\" $WORK/wheels" \
        bookworm "$MNT" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
        "deb $security bookworm-security main"
    say "root file system: $(du -sh --exclude=proc --exclude=sys "$MNT" 2>/dev/null | cut -f1)"
}

# GRUB in the MBR; a hand-written grub.cfg (update-grub would write the loop device as root=).
install_bootloader() {
    local kernel
    kernel=$(ls "$MNT"/boot/vmlinuz-* | sort -V | tail -n 1)
    kernel=${kernel##*/vmlinuz-}
    mount --bind /dev "$MNT/dev"
    mount -t proc proc "$MNT/proc"
    mount -t sysfs sysfs "$MNT/sys"
    chroot "$MNT" grub-install --target=i386-pc --modules="part_msdos ext2 biosdisk" "$LOOP" 2>&1 |
        grep -v 'Installation finished' || true
    cat >"$MNT/boot/grub/grub.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'Debian bookworm (cmtrace VM stage)' {
    insmod part_msdos
    insmod ext2
    search --no-floppy --label root --set=root
    linux /boot/vmlinuz-$kernel root=LABEL=root ro console=tty0 console=ttyS0,115200n8 net.ifnames=0
    initrd /boot/initrd.img-$kernel
}
EOF
    umount "$MNT/sys" "$MNT/proc" "$MNT/dev"
    say "bootloader: GRUB, kernel $kernel"
}

package_box() {
    # Blocks of files deleted during the build (apt's downloaded packages) are not zero; discard
    # them so that qemu-img leaves them out of the image (halves the box).
    fstrim "$MNT" 2>/dev/null || true
    umount "$MNT"
    losetup -d "$LOOP"
    LOOP=
    [ -z "$MADE_NODE" ] || rm -f "$MADE_NODE"
    MADE_NODE=
    qemu-img convert -O qcow2 "$WORK/disk.raw" "$WORK/box.img"
    rm -f "$WORK/disk.raw"
    echo "{\"provider\": \"libvirt\", \"format\": \"qcow2\", \"virtual_size\": $DISK_GB}" >"$WORK/metadata.json"
    cat >"$WORK/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
EOF
    mkdir -p "$(dirname "$OUT")"
    tar -C "$WORK" -cf "$OUT.tmp" metadata.json Vagrantfile box.img
    mv "$OUT.tmp" "$OUT"
    say "box: $OUT ($(du -h "$OUT" | cut -f1))"
}

[ "$(id -u)" = 0 ] || {
    echo "build-box: run as root" >&2
    exit 2
}
make_wheelhouse
make_disk
install_system
install_bootloader
package_box
