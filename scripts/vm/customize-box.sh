#!/bin/bash
# mmdebstrap --customize-hook of the VM stage's box: turn the fresh root file system $1 into a
# Vagrant box guest (user vagrant with the insecure key, DHCP on any NIC, serial console) and
# pre-install cmtrace's Python dependencies from the wheelhouse $2 into /opt/cmtrace/venv, so the
# guest installs cmtrace without network access (pip is set to offline with /etc/pip.conf).
set -euo pipefail
ROOT=$1
WHEELS=$2
KEY=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | tail -n 1)
[ -n "$KEY" ] || { echo "customize-box: Vagrant's insecure public key not found (install vagrant)" >&2; exit 1; }

in_root() { chroot "$ROOT" "$@"; }

# --- the vagrant user: passwordless sudo, Vagrant's insecure key (replaced at first `vagrant up`)
in_root useradd --create-home --shell /bin/bash --groups sudo vagrant
echo 'vagrant:vagrant' | in_root chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$ROOT/etc/sudoers.d/vagrant"
chmod 0440 "$ROOT/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$ROOT/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$KEY" "$ROOT/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' >"$ROOT/etc/ssh/sshd_config.d/vagrant.conf"

# --- identity, disk, network
echo cmtrace-box >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cmtrace-box\n' >"$ROOT/etc/hosts"
echo 'LABEL=root / ext4 defaults,errors=remount-ro 0 1' >"$ROOT/etc/fstab"
mkdir -p "$ROOT/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' >"$ROOT/etc/systemd/network/10-dhcp.network"
in_root systemctl enable systemd-networkd systemd-resolved >/dev/null 2>&1
ln -sf /run/systemd/resolve/resolv.conf "$ROOT/etc/resolv.conf"

# --- ssh host keys: made at first boot, so every VM built from the box has its own
rm -f "$ROOT"/etc/ssh/ssh_host_*
cat >"$ROOT/etc/systemd/system/ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Create SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
in_root systemctl enable ssh-host-keys.service >/dev/null 2>&1

# --- cmtrace's Python dependencies, offline (see scripts/vm/build-box.sh for the wheelhouse)
mkdir -p "$ROOT/var/cache/cmtrace-wheels"
cp "$WHEELS"/* "$ROOT/var/cache/cmtrace-wheels/"
printf '[global]\nno-index = true\nfind-links = /var/cache/cmtrace-wheels\n' >"$ROOT/etc/pip.conf"
in_root /usr/bin/python3 -m venv --system-site-packages /opt/cmtrace/venv
in_root sh -c 'cd /var/cache/cmtrace-wheels && /opt/cmtrace/venv/bin/pip install -q --no-index --find-links . ./*.whl'
in_root /opt/cmtrace/venv/bin/python -c 'import bcc, pyarrow, pandas, rich, elftools, pytest'
# Keep only what `pip install -e` needs later (its build back end); the rest is in the venv.
find "$ROOT/var/cache/cmtrace-wheels" -name '*.whl' ! -name 'setuptools-*' ! -name 'wheel-*' -delete
