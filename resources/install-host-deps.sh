#!/usr/bin/env bash
# Installs what building and testing zvmm needs on a Debian/Ubuntu host:
# the Rust target for the probe guest, QEMU (the reference peer), ACPICA
# (iasl validates our ACPI tables), cpio (initramfs) and lzop (LZO
# extraction tests). Idempotent.
set -euo pipefail
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v iasl >/dev/null || missing+=(acpica-tools)
command -v cpio >/dev/null || missing+=(cpio)
command -v lzop >/dev/null || missing+=(lzop)
{ command -v ping && command -v ip; } >/dev/null || missing+=(iputils-ping iproute2)
if ((${#missing[@]})); then
    echo "install-host-deps: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
    rustup target add x86_64-unknown-none
fi
for component in rustfmt clippy; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component"
done
