#!/bin/bash
# mmdebstrap customize hook of image/build.sh. $1 = the root filesystem being built. Runs on
# the build machine as root. Environment: KEYS, TSUNAGI_BIN.
set -euo pipefail
R=$1
HERE=$(cd "$(dirname "$0")" && pwd)

# The product: the release binary, its unit, its users, the default configuration.
install -m 0755 "$TSUNAGI_BIN" "$R/usr/bin/tsunagi"
cp -a "$HERE/overlay/." "$R/"
# Users at build time (static ids, the same on every box of a version): /etc is read-only.
chroot "$R" systemd-sysusers
chroot "$R" systemctl enable tsunagi.service tsunagi-provision.service tsunagi-check.service \
  systemd-networkd.service nftables.service chrony.service

# Identity comes at first boot: the machine-id is generated then, into the data partition
# (the root is read-only; the initrd has mounted /var already).
echo tsunagi > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 tsunagi\n::1 localhost ip6-localhost\n' > "$R/etc/hosts"
rm -f "$R/etc/machine-id" "$R/var/lib/dbus/machine-id" "$R/var/etc/machine-id"
ln -s ../var/etc/machine-id "$R/etc/machine-id"

# Read-only root (dm-verity); the state lives on the data partition, mounted by the initrd
# already (x-initrd.mount) so that everything after the switch to the root finds it.
cat > "$R/etc/fstab" <<'FSTAB'
PARTLABEL=data  /var  ext4   defaults,nodev,nosuid,commit=30,x-initrd.mount  0 2
tmpfs           /tmp  tmpfs  nodev,nosuid,mode=1777,size=64M  0 0
FSTAB
# What a box changes of /etc lives on the data partition (/var/etc), reached through links;
# tmpfiles copies the factory defaults there until provisioning writes the clinic's own.
mkdir -p "$R/var/etc/systemd" "$R/var/log/journal"
rm -rf "$R/etc/tsunagi" "$R/etc/systemd/network"
ln -s ../var/etc/tsunagi "$R/etc/tsunagi"
ln -s ../../var/etc/systemd/network "$R/etc/systemd/network"
cp -a "$R/usr/share/tsunagi/factory/tsunagi" "$R/var/etc/tsunagi"
cp -a "$R/usr/share/tsunagi/factory/network" "$R/var/etc/systemd/network"

KVER=$(ls "$R/lib/modules" | sort -V | tail -1)
[ -s "$R/boot/initrd.img-$KVER" ] || chroot "$R" dracut --force /boot/initrd.img-"$KVER" "$KVER"
chroot "$R" systemctl set-default multi-user.target

# RAUC: the A/B slots, and the update CA (test keys unless real ones were passed in).
mkdir -p "$R/etc/rauc"
cp "$HERE/rauc/system.conf" "$R/etc/rauc/system.conf"
install -D -m 0755 "$HERE/rauc/rauc-sdboot-backend" "$R/usr/local/sbin/rauc-sdboot-backend"
if [ -s "$KEYS/ca.cert.pem" ]; then cp "$KEYS/ca.cert.pem" "$R/etc/rauc/keyring.pem"; fi

# No way to log in: no getty on any console, no emergency or rescue shell, root locked, no
# login programs; no package manager at run time.
for unit in getty@.service serial-getty@.service console-getty.service container-getty@.service \
            autovt@.service emergency.service rescue.service debug-shell.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
rm -f "$R/etc/systemd/system/getty.target.wants/"*
passwd -R "$R" -l root >/dev/null
rm -f "$R/usr/bin/login" "$R/bin/login" "$R/usr/sbin/agetty" "$R/sbin/agetty" \
      "$R/usr/sbin/sulogin" "$R/sbin/sulogin" "$R/usr/bin/su" "$R/bin/su"
rm -f "$R"/usr/bin/dpkg "$R"/usr/bin/dpkg-* "$R"/usr/bin/apt "$R"/usr/bin/apt-*
rm -rf "$R/var/cache/apt" "$R/var/lib/apt/lists"
