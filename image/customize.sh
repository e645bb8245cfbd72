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
chroot "$R" systemctl enable tsunagi.service tsunagi-provision.service tsunagi-check.service tsunagi-share.service tsunagi-grow-data.service \
  tsunagi-update-install.path tsunagi-health-gate.service \
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
# Time (IHE Consistent Time): chrony's only source is the network hub's NTP server, through
# the tunnel, which `tsunagi medium apply` writes into sources.d from the clinic's config
# ([tunnel] time-server); no public pool.
mkdir -p "$R/var/etc/chrony/sources.d"
rm -rf "$R/etc/chrony/sources.d"
ln -s ../../var/etc/chrony/sources.d "$R/etc/chrony/sources.d"
cat > "$R/etc/chrony/chrony.conf" <<'CHRONY'
# tsunagi: the network hub's time server only (sources.d, written from the clinic's config).
sourcedir /etc/chrony/sources.d
driftfile /var/lib/chrony/chrony.drift
# A clock more than 1 s off is stepped in the first three updates, slewed afterwards.
makestep 1 3
rtcsync
CHRONY

KVER=$(ls "$R/lib/modules" | sort -V | tail -1)
# Lean: kernel modules for hardware and protocols a clinic box does not have or speak
# (sound, graphics, cameras, radios, InfiniBand, industrial I/O, staging drivers, cluster
# and network file systems but SMB), then the module index and the initrd again. Kept:
# Ethernet, storage (SATA, NVMe, USB sticks, virtio), ext4/vfat/squashfs/erofs/SMB,
# netfilter, WireGuard, dm-verity/crypt, TPM, watchdogs, HID.
MODS=$R/usr/lib/modules/$KVER/kernel
for d in sound drivers/gpu drivers/media drivers/infiniband drivers/iio drivers/staging \
         drivers/isdn drivers/comedi drivers/net/wireless drivers/net/wwan drivers/net/can \
         drivers/bluetooth drivers/nfc drivers/atm drivers/target drivers/mtd \
         drivers/input/joystick drivers/input/touchscreen drivers/input/tablet \
         net/wireless net/mac80211 net/bluetooth net/can net/nfc net/atm net/9p net/ceph \
         net/rds net/tipc net/sunrpc net/appletalk net/x25 net/rxrpc net/6lowpan net/ieee802154 \
         net/mac802154 net/l2tp \
         fs/xfs fs/ocfs2 fs/nfs fs/nfsd fs/btrfs fs/gfs2 fs/f2fs fs/ceph fs/zonefs fs/jfs \
         fs/reiserfs fs/nilfs2 fs/ubifs fs/orangefs fs/afs fs/coda fs/9p fs/ntfs3 fs/hfs \
         fs/hfsplus fs/ufs fs/minix fs/omfs fs/qnx4 fs/qnx6 fs/befs fs/efs fs/hpfs fs/sysv \
         fs/adfs fs/affs fs/freevxfs fs/jffs2 fs/dlm fs/lockd fs/nfs_common fs/cramfs fs/romfs \
         arch/x86/kvm drivers/input/misc/pcspkr.ko; do
  rm -rf "${MODS:?}/$d"
done
chroot "$R" depmod "$KVER"
chroot "$R" dracut --force --quiet /boot/initrd.img-"$KVER" "$KVER"
chroot "$R" systemctl set-default multi-user.target

# RAUC: the A/B slots, and the update CA (test keys unless real ones were passed in).
mkdir -p "$R/etc/rauc"
cp "$HERE/rauc/system.conf" "$R/etc/rauc/system.conf"
install -D -m 0755 "$HERE/rauc/rauc-sdboot-backend" "$R/usr/local/sbin/rauc-sdboot-backend"
if [ -s "$KEYS/ca.cert.pem" ]; then cp "$KEYS/ca.cert.pem" "$R/etc/rauc/keyring.pem"; fi
# Slot A is written at build time and good; slot B stays empty until the first update
# writes it, so it is marked bad: neither RAUC nor the boot loader ever picks it. The boot
# backend keeps these states on the data partition.
mkdir -p "$R/var/lib/rauc/sdboot"
echo good > "$R/var/lib/rauc/sdboot/state-A"
echo bad > "$R/var/lib/rauc/sdboot/state-B"

# The network's provisioning public key (issue 16): `tsunagi medium` applies only media it
# signed. Without it every medium is refused.
if [ -s "$KEYS/provisioning.pub" ]; then
  install -D -m 0644 "$KEYS/provisioning.pub" "$R/usr/share/tsunagi/provisioning.pub"
fi

# The update channel's root of trust (issue 18): the `update` service trusts only TUF
# metadata that chains to it. Without it the service cannot start (and is off by default).
if [ -s "$KEYS/update-root.json" ]; then
  install -D -m 0644 "$KEYS/update-root.json" "$R/usr/share/tsunagi/update-root.json"
fi

# The generators the box has no use for are masked: each is a process systemd runs at the
# switch to the root and at every reload, and under emulation that is seconds of the boot.
# Kept: fstab (/var, /tmp), veritysetup (the root's verity device), gpt-auto (the ESP's
# automount, where systemd-bless-boot marks the boot good) and bless-boot (boot counting).
# Masked: SysV scripts (every service here has a unit), getty (no login),
# cryptsetup and integritysetup (no such volumes yet),
# hibernation, rc.local, offline updates (RAUC updates the other slot), and the kernel
# command line's debug and run= switches.
mkdir -p "$R/etc/systemd/system-generators"
for gen in systemd-sysv-generator systemd-getty-generator \
           systemd-cryptsetup-generator systemd-integritysetup-generator \
           systemd-hibernate-resume-generator systemd-rc-local-generator \
           systemd-system-update-generator systemd-debug-generator systemd-run-generator; do
  test -e "$R/usr/lib/systemd/system-generators/$gen"
  ln -sf /dev/null "$R/etc/systemd/system-generators/$gen"
done

# No way to log in: no getty on any console, no emergency or rescue shell, root locked, no
# login programs; no package manager at run time.
for unit in getty@.service serial-getty@.service console-getty.service container-getty@.service \
            autovt@.service emergency.service rescue.service debug-shell.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
rm -f "$R/etc/systemd/system/getty.target.wants/"*
# Units a box has no use for: no logins (user sessions, utmp), no dpkg (its backup timer),
# no e2scrub (no LVM), no graphics (modprobe@drm). logind stays: it turns the power button
# (and QEMU's ACPI power-down) into a clean shutdown.
for unit in systemd-user-sessions.service systemd-update-utmp.service \
            systemd-update-utmp-runlevel.service dpkg-db-backup.timer dpkg-db-backup.service \
            e2scrub_all.timer e2scrub_all.service e2scrub_reap.service modprobe@drm.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
passwd -R "$R" -l root >/dev/null
rm -f "$R/usr/bin/login" "$R/bin/login" "$R/usr/sbin/agetty" "$R/sbin/agetty" \
      "$R/usr/sbin/sulogin" "$R/sbin/sulogin" "$R/usr/bin/su" "$R/bin/su"
rm -f "$R"/usr/bin/dpkg "$R"/usr/bin/dpkg-* "$R"/usr/bin/apt "$R"/usr/bin/apt-*
rm -rf "$R/var/cache/apt" "$R/var/lib/apt/lists"
