#!/usr/bin/env bash
# Boots the default guest: the Debian cloud kernel with a busybox
# initramfs, both from Debian packages. Installs what it needs first.
#
# On a host whose /dev/kvm is KVM-PVM (shadow paging without VT-x/AMD-V)
# stock kernels cannot complete boot (they die in PVM's instruction
# emulator), so there it boots the probe guest instead and says so; set
# ZVMM_GUEST=debian to try the Debian kernel anyway (its early boot log shows).
# Extra arguments are passed to zvmm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
bash "$here/install-host-deps.sh"
bash "$here/fetch-debian-assets.sh"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p vmm --bin zvmm
zvmm="$root/target/release/zvmm"
assets="$here/cache/debian"
guest=${ZVMM_GUEST:-auto}
if [[ "$guest" == auto ]]; then
    guest=debian
    if [[ -d /sys/module/kvm_pvm ]]; then
        guest=probe
    fi
fi
if [[ "$guest" == probe ]]; then
    echo "boot-default-guest: /dev/kvm here is KVM-PVM, where stock Linux kernels cannot" \
        "complete boot; booting the probe guest instead (ZVMM_GUEST=debian to try the kernel)." >&2
    bash "$here/probe/build.sh" >/dev/null
    # No initrd: the probe checksums it byte by byte, which is slow when the
    # guest runs in PVM's instruction emulator.
    scratch="$here/cache/probe-disk.img"
    [[ -e "$scratch" ]] || truncate -s 64M "$scratch"
    exec "$zvmm" --kernel "$here/probe/out/probe-pvh.elf" --disk "path=$scratch,serial=demo" \
        --cmdline "console=ttyS0" --cpus 2 --memory 512M "$@"
fi
# The vmlinux inside the bzImage boots through PVH, skipping the in-guest
# decompression; `--kernel "$assets/vmlinuz"` boots the bzImage itself.
[[ -s "$assets/vmlinux" ]] || "$zvmm" kernel extract "$assets/vmlinuz" -o "$assets/vmlinux"
exec "$zvmm" --kernel "$assets/vmlinux" --initrd "$assets/initramfs.cpio" \
    --cmdline "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1" \
    --cpus 2 --memory 512M "$@"
