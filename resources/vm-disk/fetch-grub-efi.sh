#!/usr/bin/env bash
# Fetches GRUB's EFI binary for x86-64 from Debian's grub-efi-amd64-bin
# (the monolithic, unsigned grubx64.efi) into resources/cache/grub/ and
# prints its path. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$(dirname "$here")/cache/grub"
efi="$out/grubx64.efi"
if [[ -s "$efi" ]]; then
    echo "$efi"
    exit 0
fi
command -v apt-get >/dev/null || {
    echo "fetch-grub-efi: needs apt-get (a Debian or Ubuntu host)" >&2
    exit 1
}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download -qq -o APT::Sandbox::User=root grub-efi-amd64-bin >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get download -qq -o APT::Sandbox::User=root grub-efi-amd64-bin >/dev/null
}
dpkg-deb -x ./grub-efi-amd64-bin_*.deb root
cp root/usr/lib/grub/x86_64-efi/monolithic/grubx64.efi "$efi.partial"
dpkg-deb -f ./grub-efi-amd64-bin_*.deb Version >"$out/version"
mv "$efi.partial" "$efi"
echo "$efi"
