#!/usr/bin/env bash
# Fetches the default guest's parts from Debian packages into resources/cache/:
#   debian/vmlinuz        the Debian cloud kernel (bzImage)
#   debian/initramfs.cpio a busybox initramfs whose /init prints a banner,
#                         shows the devices it sees and powers the VM off
#   debian/OVMF.fd        stock EFI firmware (for firmware boot)
# Idempotent: does nothing when the files are already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/cache/debian"
mkdir -p "$out"
if [[ -s "$out/vmlinuz" && -s "$out/initramfs.cpio" && -s "$out/OVMF.fd" ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "fetch-debian-assets: needs apt-get (a Debian or Ubuntu host)" >&2
    exit 1
fi
need_install=()
command -v cpio >/dev/null || need_install+=(cpio)
if ((${#need_install[@]})); then
    apt-get install -y -qq "${need_install[@]}" >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# The meta package names the current kernel ABI; prefer its unsigned image.
apt-get update -qq >/dev/null 2>&1 || true
image=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
if [[ -z "$image" ]]; then
    echo "fetch-debian-assets: cannot resolve linux-image-cloud-amd64" >&2
    exit 1
fi
if apt-cache show "$image-unsigned" >/dev/null 2>&1; then
    image="$image-unsigned"
fi
apt-get download -qq -o APT::Sandbox::User=root "$image" busybox-static ovmf >/dev/null
for deb in ./*.deb; do
    dpkg-deb -x "$deb" root
done
cp root/boot/vmlinuz-* "$out/vmlinuz"
echo "${image}" >"$out/kernel-package"
cp root/usr/share/ovmf/OVMF.fd "$out/OVMF.fd"

# A busybox initramfs: /init mounts the basics, reports and powers off.
rd="$work/initramfs"
mkdir -p "$rd"/{bin,sbin,proc,sys,dev,etc,tmp}
cp root/bin/busybox "$rd/bin/busybox"
cp "$here/initramfs-init.sh" "$rd/init"
chmod 755 "$rd/init"
(cd "$rd" && find . | cpio -o -H newc --quiet >"$out/initramfs.cpio")
echo "fetch-debian-assets: $(ls "$out" | tr '\n' ' ')in $out"
