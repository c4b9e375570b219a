#!/usr/bin/env bash
# Builds resources/cache/container/initramfs.cpio for zvmm's container mode
# from Debian packages: busybox-static, and the virtio-fs and virtio-pci
# modules (with what they depend on, uncompressed) of the kernel package
# that resources/cache/debian/kernel-package names, when that kernel has
# them as modules. Its /init is init.sh. Also writes, next to it:
#   kernel-config   the kernel's build configuration
#   kernel-package  the package the modules came from
# Idempotent: does nothing when those are there, for the same kernel
# package, and newer than this script and init.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$here/common.sh"
debian="$(cd "$here/.." && pwd)/cache/debian"
out=$container_cache

[[ -s "$debian/kernel-package" ]] || bash "$here/../fetch-debian-assets.sh"
package=$(cat "$debian/kernel-package")
if [[ -s "$out/initramfs.cpio" && -s "$out/kernel-config" &&
    "$(cat "$out/kernel-package" 2>/dev/null)" == "$package" &&
    "$out/initramfs.cpio" -nt "$here/init.sh" && "$out/initramfs.cpio" -nt "$0" ]]; then
    exit 0
fi
command -v cpio >/dev/null || apt-get install -y -qq cpio >/dev/null
busybox=$(cached_busybox)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fetch_debs "$work/pkg" "$package"
cmp -s "$work"/pkg/boot/vmlinuz-* "$debian/vmlinuz" ||
    die "$debian/vmlinuz is not the kernel of $package now in Debian; refresh it: rm -r $debian && bash resources/fetch-debian-assets.sh"
config=$(echo "$work"/pkg/boot/config-*)
version=${config##*/config-}

# Prints the value of CONFIG_$1 (y, m or nothing).
config_value() {
    sed -n "s/^CONFIG_$1=//p" "$config"
}
wanted=()
for option in VIRTIO_PCI:virtio_pci VIRTIO_FS:virtiofs; do
    case "$(config_value "${option%%:*}")" in
    y) ;;
    m) wanted+=("${option#*:}") ;;
    *) die "kernel $version has no CONFIG_${option%%:*}; it cannot mount a virtio-fs root" ;;
    esac
done

# Moves the package's modules to $work/mods/lib/modules/$version,
# uncompressed (busybox insmod loads plain .ko files), and runs depmod.
stage_modules() {
    local from
    for from in "$work"/pkg/{,usr/}lib/modules/"$version"; do
        [[ -d "$from" ]] && break
    done
    [[ -d "$from" ]] || die "$package has no lib/modules/$version"
    mkdir -p "$work/mods/lib/modules"
    mv "$from" "$mods"
    decompress xz xz-utils xz -d
    decompress zst zstd zstd -dq --rm
    decompress gz gzip gzip -d
    "$busybox" depmod -b "$work/mods" "$version"
}

# Decompresses every module ending in .ko.$1 with $3..., installing
# Debian's package $2 for it when needed.
decompress() {
    local suffix=$1 package=$2 tool=$3
    shift 2
    [[ -n "$(find "$mods" -name "*.ko.$suffix" -print -quit)" ]] || return 0
    command -v "$tool" >/dev/null || apt-get install -y -qq "$package" >/dev/null
    find "$mods" -name "*.ko.$suffix" -exec "$@" {} +
}

# Prints the modules.dep path of module $1.
module_path() {
    awk -F: -v name="$1" '{ base = $1; sub(/.*\//, "", base); sub(/\.ko$/, "", base);
        gsub(/-/, "_", base); if (base == name) { print $1; exit } }' "$mods/modules.dep"
}

# Appends module path $1 to $order after everything it depends on.
visit() {
    local deps dep
    [[ " ${order[*]} " == *" $1 "* ]] && return 0
    read -ra deps <<<"$(awk -F: -v key="$1" '$1 == key { print $2 }' "$mods/modules.dep")"
    for dep in "${deps[@]}"; do
        visit "$dep"
    done
    order+=("$1")
}

rd="$work/initramfs"
mkdir -p "$rd"/{dev,proc,sys,tmp,newroot}
install_busybox "$busybox" "$rd"
cp "$here/init.sh" "$rd/init"
chmod 755 "$rd/init"
order=()
if ((${#wanted[@]})); then
    mods="$work/mods/lib/modules/$version"
    stage_modules
    for name in "${wanted[@]}"; do
        path=$(module_path "$name")
        [[ -n "$path" ]] || die "$package has no module $name.ko"
        visit "$path"
    done
    into="$rd/lib/modules/$version"
    for path in "${order[@]}"; do
        mkdir -p "$into/$(dirname "$path")"
        cp "$mods/$path" "$into/$path"
        echo "$path" >>"$into/modules.zvmm-order"
        awk -F: -v key="$path" '$1 == key' "$mods/modules.dep" >>"$into/modules.dep"
    done
fi
(cd "$rd" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet >"$work/initramfs.cpio")
mkdir -p "$out"
mv "$work/initramfs.cpio" "$out/initramfs.cpio"
cp "$config" "$out/kernel-config"
echo "$package" >"$out/kernel-package"
echo "build-initramfs: $out/initramfs.cpio for $version (modules: ${order[*]:-none, all built in})"
