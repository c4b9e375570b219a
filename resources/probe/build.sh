#!/bin/sh
# Builds both probe flavours and copies them to resources/probe/out/:
#   out/probe-pvh.elf      PVH ELF (XEN_ELFNOTE_PHYS32_ENTRY -> 32-bit entry)
#   out/probe-linux64.elf  Linux 64-bit boot protocol ELF (e_entry = 64-bit entry)
set -eu
cd "$(dirname "$0")"
libdir=$(rustc --print target-libdir --target x86_64-unknown-none 2>/dev/null || true)
if [ -z "$libdir" ] || ! ls "$libdir"/libcore-*.rlib >/dev/null 2>&1; then
    echo "x86_64-unknown-none is not installed; run: rustup target add x86_64-unknown-none" >&2
    exit 1
fi
CARGO_TARGET_DIR="$PWD/target" cargo build --release --target x86_64-unknown-none
mkdir -p out
cp target/x86_64-unknown-none/release/probe-pvh out/probe-pvh.elf
cp target/x86_64-unknown-none/release/probe-linux64 out/probe-linux64.elf
echo "$PWD/out/probe-pvh.elf"
echo "$PWD/out/probe-linux64.elf"
