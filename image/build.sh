#!/bin/bash
# Builds the appliance image (issue 7): a GPT disk with an ESP (systemd-boot, one unified
# kernel image per slot), root A and root B (read-only squashfs, each with its dm-verity hash
# partition; the root hash is on the UKI's command line) and a data partition (ext4).
#
# Run by `cargo xtask image` (which installs the host packages, builds the release binary
# and caches the result by input hash); needs root. Environment:
#   OUT           output directory: tsunagi.raw, tsunagi.qcow2, roothash, build.json, and
#                 tsunagi.raucb (the same version as a signed RAUC bundle, for updates)
#   WORK          scratch directory (rootfs, partition images)
#   TSUNAGI_BIN   the release `tsunagi` binary to install
#   KEYS          directory with real keys (db.key/db.crt for UKI signing, ca.cert.pem for
#                 RAUC's keyring and update.key.pem/update.cert.pem to sign bundles,
#                 update-root.json: the update channel's TUF root (optional),
#                 provisioning.pub: the network's provisioning public key that
#                 `tsunagi-provision init` printed); default: test keys generated into
#                 $WORK/keys (never committed)
#   VERSION       the image's version (IMAGE_VERSION in os-release; the bundle's); default 1
#   FAULT         TESTS ONLY: a fault built into the image, for the update tests' rollback
#                 (`cargo xtask release VERSION --fault never-ready`): `never-ready`, a
#                 supervisor that never tells systemd it is ready; default none
#   ROOTFS_CACHE  optional: a directory that keeps the root filesystem as mmdebstrap and
#                 customize.sh made it, for the next build whose only differences are
#                 VERSION and FAULT (`cargo xtask` names it by a hash of every other input)
#   SOURCE_DATE_EPOCH  timestamps of everything built (default: the commit's time, set by
#                 the caller)
# The Debian packages come from the build machine's own apt sources: no mirror is named.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
: "${OUT:?OUT must be set}" "${WORK:?WORK must be set}" "${TSUNAGI_BIN:?TSUNAGI_BIN must be set}"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1767225600}
VERSION=${VERSION:-1}
FAULT=${FAULT:-}
case "$FAULT" in
  ''|never-ready) ;;
  *) echo "build.sh: unknown FAULT '$FAULT' (only never-ready)" >&2; exit 2 ;;
esac
mkdir -p "$OUT" "$WORK"
step() { printf 'image: %s\n' "$*" >&2; }

# --- keys: test keys at build time unless real ones are passed in by path ---------------
# The keys are an input like the packages: the update CA's certificate is in the root, so
# two builds give the same root hash only with the same keys. `cargo xtask image` keeps its
# test keys in target/image-keys across builds. `build.sh keys` only makes them.
KEYS=${KEYS:-$WORK/keys}
if [ ! -s "$KEYS/db.key" ]; then
  step "generating TEST keys into $KEYS (never use them for a real fleet)"
  mkdir -p "$KEYS"
  (
    cd "$KEYS"; umask 077
    subj=/O=tsunagi-TEST-ONLY
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout ca.key.pem -out ca.cert.pem -days 3650 -subj "$subj/CN=test update CA" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -keyout db.key -out db.crt -days 3650 \
      -subj "$subj/CN=test secure boot db" 2>/dev/null
  )
fi
if [ ! -s "$KEYS/update.key.pem" ]; then
  # The update signing key (issue 18): RAUC bundles are signed with it, and a box installs
  # only bundles whose signer chains to the update CA in its keyring (/etc/rauc/keyring.pem).
  step "generating a TEST update signing key into $KEYS (never use it for a real fleet)"
  (
    cd "$KEYS"; umask 077
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout update.key.pem -out update.csr -subj "/O=tsunagi-TEST-ONLY/CN=test update signing" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' > update.ext
    openssl x509 -req -in update.csr -CA ca.cert.pem -CAkey ca.key.pem -set_serial 2 \
      -days 3650 -extfile update.ext -out update.cert.pem 2>/dev/null
    rm update.csr update.ext
  )
fi
if [ ! -s "$KEYS/provisioning.pub" ]; then
  # The network's provisioning key (issue 16): media signed with provisioning.key are the
  # only ones the box applies. As `tsunagi-provision` keeps keys: base64 of the PKCS#8 DER
  # (`--signing-key`), and base64 of the 32-byte public key.
  step "generating a TEST provisioning key into $KEYS (never use it for a real network)"
  mkdir -p "$KEYS"
  (
    cd "$KEYS"; umask 077
    openssl genpkey -algorithm ed25519 -outform DER -out provisioning.key.der
    base64 -w0 provisioning.key.der > provisioning.key
    openssl pkey -inform DER -in provisioning.key.der -pubout -outform DER | tail -c 32 |
      base64 -w0 > provisioning.pub
    rm provisioning.key.der
    chmod 0644 provisioning.pub
  )
fi

[ "${1:-}" = keys ] && exit 0

# --- root filesystem -------------------------------------------------------------------
SOURCES=
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
  if [ -s "$f" ] && grep -qv '^\s*#' "$f"; then SOURCES=$f; break; fi
done
[ -n "$SOURCES" ] || { echo "image: no apt sources on this machine" >&2; exit 1; }

# What a box needs, and nothing else: no compiler, no package manager at run time (apt is
# not installed; dpkg's programs are removed), no sshd, no getty.
PKGS=(
  linux-image-amd64 systemd systemd-sysv udev dbus kmod
  dracut dracut-core libcryptsetup12 cryptsetup-bin
  systemd-boot systemd-resolved
  iproute2 nftables wireguard-tools chrony
  rauc rauc-service e2fsprogs ca-certificates
)
R=$WORK/rootfs
rm -rf "$R"
if [ -n "${ROOTFS_CACHE:-}" ] && [ -f "$ROOTFS_CACHE/complete" ]; then
  # The same packages, overlay, binary and keys as the last build: only the version (and a
  # test fault) differ, and they are written below.
  step "rootfs: reused from $ROOTFS_CACHE (mmdebstrap's and customize.sh's, same inputs)"
  cp -a "$ROOTFS_CACHE/rootfs" "$R"
else
  step "rootfs: mmdebstrap (the machine's own apt sources)"
  mmdebstrap \
    --mode=root --variant=essential --components=main \
    --include="$(IFS=,; echo "${PKGS[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --essential-hook="mkdir -p \"\$1/etc/dracut.conf.d\" && cp $HERE/dracut/90-tsunagi.conf \"\$1/etc/dracut.conf.d/\"" \
    --customize-hook="KEYS=$KEYS TSUNAGI_BIN=$TSUNAGI_BIN $HERE/customize.sh \"\$1\"" \
    bookworm "$R" "$SOURCES" >&2
  if [ -n "${ROOTFS_CACHE:-}" ]; then
    rm -rf "$ROOTFS_CACHE"
    mkdir -p "$ROOTFS_CACHE"
    cp -a "$R" "$ROOTFS_CACHE/rootfs"
    touch "$ROOTFS_CACHE/complete"
  fi
fi

KVER=$(ls "$R/lib/modules" | sort -V | tail -1)
cp "$R/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
# The initrd comes uncompressed from dracut (image/dracut/90-tsunagi.conf); zstd at
# dracut's own level.
zstd -15 -q -f --no-progress "$R/boot/initrd.img-$KVER" -o "$WORK/initrd.img"
sed -i '/^IMAGE_ID=/d; /^IMAGE_VERSION=/d' "$R/usr/lib/os-release"
printf 'IMAGE_ID=tsunagi\nIMAGE_VERSION=%s\n' "$VERSION" >> "$R/usr/lib/os-release"
if [ "$FAULT" = never-ready ]; then
  step "TEST FAULT: the supervisor never becomes ready (a test release, never for a fleet)"
  mkdir -p "$R/usr/lib/systemd/system/tsunagi.service.d"
  printf '%s\n' \
    '# TEST FAULT (cargo xtask release VERSION --fault never-ready): the supervisor is never' \
    '# ready, for the health gate and the rollback the update tests prove. Never for a fleet.' \
    '[Service]' 'ExecStart=' 'ExecStart=/usr/bin/sleep infinity' \
    > "$R/usr/lib/systemd/system/tsunagi.service.d/90-test-fault.conf"
fi

# Nothing in the image is newer than SOURCE_DATE_EPOCH (dpkg, ldconfig, the certificate
# links and every directory carry the build's own time otherwise).
find "$R" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

# --- read-only root and its dm-verity hash tree -----------------------------------------
# /var is only a mount point in the root: the data partition is mounted there.
step "root: squashfs (timestamps from SOURCE_DATE_EPOCH) and dm-verity"
rm -f "$WORK/root.img"
mksquashfs "$R" "$WORK/root.img" -comp lz4 -Xhc -b 128K -noappend -no-progress \
  -wildcards -e 'boot/*' -e 'var/*' -processors "$(nproc)" >/dev/null
SALT=$(printf 'tsunagi-%s' "$VERSION" | sha256sum | cut -c1-64)
VUUID=$(printf 'tsunagi-verity-%s' "$VERSION" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
veritysetup format "$WORK/root.img" "$WORK/root.verity" --salt="$SALT" --uuid="$VUUID" \
  --root-hash-file="$OUT/roothash" >/dev/null
ROOTHASH=$(cat "$OUT/roothash")
veritysetup verify "$WORK/root.img" "$WORK/root.verity" "$ROOTHASH"

# --- one signed UKI per slot (the command line, with the root hash, is inside) ----------
step "UKIs: slot A and B, signed"
cp "$R/usr/lib/os-release" "$WORK/os-release"
for SLOT in a b; do
  S=${SLOT^^}
  printf '%s' "roothash=$ROOTHASH systemd.verity_root_data=/dev/disk/by-partlabel/root-$SLOT systemd.verity_root_hash=/dev/disk/by-partlabel/root-$SLOT-verity systemd.verity_root_options=panic-on-corruption root=/dev/mapper/root rootfstype=squashfs ro console=ttyS0,115200 loglevel=4 lockdown=integrity panic=10 rd.shell=0 rd.emergency=reboot rauc.slot=$S" \
    > "$WORK/cmdline-$S.txt"
  objcopy \
    --add-section .osrel="$WORK/os-release"       --change-section-vma .osrel=0x20000 \
    --add-section .cmdline="$WORK/cmdline-$S.txt" --change-section-vma .cmdline=0x30000 \
    --add-section .linux="$WORK/vmlinuz"          --change-section-vma .linux=0x2000000 \
    --add-section .initrd="$WORK/initrd.img"      --change-section-vma .initrd=0x3000000 \
    /usr/lib/systemd/boot/efi/linuxx64.efi.stub "$WORK/uki-$S.unsigned.efi"
  python3 "$HERE/pe-normalize.py" "$WORK/uki-$S.unsigned.efi"
  sbsign --key "$KEYS/db.key" --cert "$KEYS/db.crt" --output "$WORK/uki-$S.efi" \
    "$WORK/uki-$S.unsigned.efi" 2>/dev/null
done

# --- the same version as a RAUC bundle (verity format), signed with the update key -----
# What `cargo xtask release` publishes: the root and its hash tree for the other slot's
# partitions, and both UKIs (the hook puts the one of the slot written on the ESP).
if [ -s "$KEYS/update.key.pem" ]; then
  step "bundle: RAUC (verity format), version $VERSION, signed"
  B=$WORK/bundle
  rm -rf "$B"; mkdir -p "$B"
  ln "$WORK/root.img" "$B/root.img"
  # RAUC 1.8 writes a raw slot only from an image it recognises by its name (*.img).
  ln "$WORK/root.verity" "$B/root-verity.img"
  cp "$WORK/uki-A.efi" "$WORK/uki-B.efi" "$B/"
  install -m 0755 "$HERE/rauc/bundle-hook" "$B/hook"
  printf '[update]\ncompatible=tsunagi\nversion=%s\n\n[bundle]\nformat=verity\n\n[hooks]\nfilename=hook\n\n[image.rootfs]\nfilename=root.img\nhooks=post-install\n\n[image.verity]\nfilename=root-verity.img\n' \
    "$VERSION" > "$B/manifest.raucm"
  rm -f "$OUT/tsunagi.raucb"
  rauc bundle --cert="$KEYS/update.cert.pem" --key="$KEYS/update.key.pem" "$B" "$OUT/tsunagi.raucb" >&2
  rauc info --keyring="$KEYS/ca.cert.pem" "$OUT/tsunagi.raucb" >/dev/null
  rm -rf "$B"
fi

# --- ESP: systemd-boot, slot A's UKI with boot counting ---------------------------------
rm -f "$WORK/esp.img"
mkfs.vfat -C -F 32 -n ESP -i 74737567 --invariant "$WORK/esp.img" $((128*1024)) >/dev/null
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/Linux ::/loader
mcopy -i "$WORK/esp.img" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$WORK/esp.img" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/systemd/systemd-bootx64.efi
printf 'timeout 0\ndefault tsunagi-A.efi\neditor no\nconsole-mode keep\n' > "$WORK/loader.conf"
mcopy -i "$WORK/esp.img" "$WORK/loader.conf" ::/loader/loader.conf
mcopy -i "$WORK/esp.img" "$WORK/uki-A.efi" "::/EFI/Linux/tsunagi-A+3.efi"

# --- data partition: the image's /var (machine-id, keys, logs and state live here) -------
# 4 KiB blocks, not the 1 KiB that mke2fs picks for a file system this small: SQLite
# allocates a WAL index (its -shm file, mapped into memory) by writing the last byte of
# each 4 KiB page, which with 1 KiB blocks leaves three blocks of the page unallocated; on
# a full disk a store into them is SIGBUS, not an error (a boot in CI saw the DICOM
# service killed so, four times).
rm -f "$WORK/data.img"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -b 4096 -i 8192 -L data -U 74737567-6e61-4769-8264-617461000001 \
  -E root_owner=0:0,hash_seed=74737567-6e61-4769-8264-617461000002 -d "$R/var" "$WORK/data.img" 256M

# --- the GPT disk ------------------------------------------------------------------------
step "disk: GPT esp | root-a | root-a-verity | root-b | root-b-verity | data"
uuid_of() { echo "$1" | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/'; }
RUUID=$(uuid_of "${ROOTHASH:0:32}"); HUUID=$(uuid_of "${ROOTHASH:32:32}")
DISK=$OUT/tsunagi.raw
rm -f "$DISK"; truncate -s 1500M "$DISK"
sfdisk -q "$DISK" <<EOF
label: gpt
label-id: 74737567-6E61-4769-8264-69736B000000
first-lba: 2048
size=128MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=74737567-6E61-4769-8265-737000000001, name="esp"
size=512MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$RUUID, name="root-a"
size=16MiB,  type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, uuid=$HUUID, name="root-a-verity"
size=512MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=74737567-6E61-4769-8272-6F6F74000002, name="root-b"
size=16MiB,  type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, uuid=74737567-6E61-4769-8276-657200000002, name="root-b-verity"
size=256MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=74737567-6E61-4769-8264-617461000003, name="data"
EOF
put() {
  local n=$1 f=$2 start
  start=$(sfdisk -J "$DISK" | python3 -c "import json,sys;print(json.load(sys.stdin)['partitiontable']['partitions'][$n-1]['start'])")
  dd if="$f" of="$DISK" bs=1M seek=$((start*512)) oflag=seek_bytes conv=notrunc,sparse status=none
}
put 1 "$WORK/esp.img"; put 2 "$WORK/root.img"; put 3 "$WORK/root.verity"; put 6 "$WORK/data.img"
qemu-img convert -O qcow2 "$DISK" "$OUT/tsunagi.qcow2"

printf '{"roothash":"%s","root_bytes":%s,"version":"%s"}\n' "$ROOTHASH" \
  "$(stat -c %s "$WORK/root.img")" "$VERSION" > "$OUT/build.json"
step "done: $DISK ($(du -h --apparent-size "$DISK" | cut -f1) sparse, $(du -h "$DISK" | cut -f1) used), root hash $ROOTHASH"
