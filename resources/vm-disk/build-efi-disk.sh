#!/usr/bin/env bash
# Builds a bootable raw EFI disk for VM mode (PVH firmware such as
# rust-hypervisor-firmware as --kernel, this disk as the first --disk),
# without root or loop devices, from Debian packages:
#   sparse file (truncate), GPT (sgdisk, package gdisk),
#   partition 1: EFI system partition, FAT32 formatted in place
#     (mkfs.fat --offset, package dosfstools) and filled with mtools
#     (mcopy -i IMAGE@@OFFSET): /vmlinuz, /initramfs.cpio, a boot loader
#     spec entry /loader/loader.conf + /loader/entries/zvmm.conf
#     (linux, initrd, options), and with --grub GRUB's EFI binary as
#     \EFI\BOOT\BOOTX64.EFI with a grub.cfg booting the same kernel,
#   partition 2: Linux root (type 8304), ext4 written in place
#     (mkfs.ext4 -E offset=, package e2fsprogs), from --root-dir if given.
# Usage: build-efi-disk.sh [options] OUTPUT   (see --help)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
resources=$(dirname "$here")

usage() {
    cat <<EOF
usage: $(basename "$0") [options] OUTPUT
  --size SIZE          disk size (truncate syntax, default 2G; the file is sparse)
  --esp-mib MIB        EFI system partition size in MiB (default 256, at least 40)
  --kernel PATH        relocatable bzImage (default resources/cache/debian/vmlinuz)
  --initrd PATH        initramfs (default resources/cache/debian/initramfs.cpio)
  --options TEXT       kernel command line of the entry (default "console=ttyS0")
  --root-dir DIR       files for the root partition (default: an empty ext4)
  --grub               add GRUB (grub-efi-amd64-bin) as \\EFI\\BOOT\\BOOTX64.EFI
  --no-loader-entries  leave out /loader (the firmware then boots BOOTX64.EFI)
  --force              replace OUTPUT if it exists
EOF
}

die() {
    echo "build-efi-disk: $*" >&2
    exit 1
}

size=2G
esp_mib=256
kernel="$resources/cache/debian/vmlinuz"
initrd="$resources/cache/debian/initramfs.cpio"
options="console=ttyS0"
root_dir=""
grub=0
loader_entries=1
force=0
output=""
while (($#)); do
    case "$1" in
    --size) size=${2:?--size needs a value}; shift ;;
    --esp-mib) esp_mib=${2:?--esp-mib needs a value}; shift ;;
    --kernel) kernel=${2:?--kernel needs a path}; shift ;;
    --initrd) initrd=${2:?--initrd needs a path}; shift ;;
    --options) options=${2?--options needs a value}; shift ;;
    --root-dir) root_dir=${2:?--root-dir needs a directory}; shift ;;
    --grub) grub=1 ;;
    --no-loader-entries) loader_entries=0 ;;
    --force) force=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [[ -z "$output" ]] || die "more than one OUTPUT: $output and $1"; output=$1 ;;
    esac
    shift
done
[[ -n "$output" ]] || { usage >&2; die "no OUTPUT given"; }
[[ "$esp_mib" =~ ^[0-9]+$ ]] && ((esp_mib >= 40)) ||
    die "--esp-mib $esp_mib: FAT32 with 512-byte clusters needs at least 40 MiB"
[[ -f "$kernel" ]] || die "kernel $kernel not found (bash resources/fetch-debian-assets.sh fetches Debian's)"
[[ -f "$initrd" ]] || die "initrd $initrd not found (bash resources/fetch-debian-assets.sh fetches one)"
[[ -z "$root_dir" || -d "$root_dir" ]] || die "--root-dir $root_dir is not a directory"
if [[ -e "$output" && $force -eq 0 ]]; then
    die "$output exists; pass --force to replace it"
fi
if [[ "$options" == *$'\n'* ]]; then
    die "--options must be one line"
fi

missing=()
command -v sgdisk >/dev/null || missing+=(gdisk)
command -v mkfs.fat >/dev/null || missing+=(dosfstools)
command -v mcopy >/dev/null || missing+=(mtools)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if ((${#missing[@]})); then
    die "needs ${missing[*]}: apt-get install ${missing[*]} (or bash resources/install-host-deps.sh)"
fi
grub_efi=""
if ((grub)); then
    grub_efi=$(bash "$here/fetch-grub-efi.sh")
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
image="$output.partial"
rm -f "$image"
truncate -s "$size" "$image"

# GPT: the ESP at 1 MiB, the root partition over the rest.
sgdisk --clear \
    --new "1:2048:+${esp_mib}M" --typecode 1:EF00 --change-name "1:EFI system partition" \
    --new 2:0:0 --typecode 2:8304 --change-name 2:root \
    "$image" >/dev/null || die "sgdisk could not partition $image (is --size large enough?)"
first_sector() { sgdisk --info "$1" "$image" | awk '/^First sector:/ {print $3}'; }
last_sector() { sgdisk --info "$1" "$image" | awk '/^Last sector:/ {print $3}'; }
esp_start=$(first_sector 1)
root_start=$(first_sector 2)
root_end=$(last_sector 2)

# The ESP: FAT32 in place, files through mtools.
mkfs.fat -F 32 -s 1 -n ESP --offset "$esp_start" "$image" $((esp_mib * 1024)) >/dev/null 2>&1 ||
    die "mkfs.fat failed on $image"
export MTOOLS_SKIP_CHECK=1
esp="$image@@$((esp_start * 512))"
put() { mcopy -o -i "$esp" "$1" "::$2"; }
mmd -i "$esp" ::/EFI ::/EFI/BOOT
put "$kernel" /vmlinuz
put "$initrd" /initramfs.cpio
if ((loader_entries)); then
    mmd -i "$esp" ::/loader ::/loader/entries
    printf 'default zvmm.conf\ntimeout 0\n' >"$work/loader.conf"
    printf 'title zvmm VM (Debian kernel)\nlinux /vmlinuz\ninitrd /initramfs.cpio\noptions %s\n' \
        "$options" >"$work/zvmm.conf"
    put "$work/loader.conf" /loader/loader.conf
    put "$work/zvmm.conf" /loader/entries/zvmm.conf
fi
if ((grub)); then
    # Debian's monolithic grubx64.efi reads $prefix/grub.cfg (prefix
    # /EFI/debian) and falls back to the directory it was loaded from.
    cat >"$work/grub.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
menuentry "zvmm VM (Debian kernel)" {
  linux /vmlinuz $options
  initrd /initramfs.cpio
}
EOF
    mmd -i "$esp" ::/EFI/debian
    put "$grub_efi" /EFI/BOOT/BOOTX64.EFI
    put "$work/grub.cfg" /EFI/BOOT/grub.cfg
    put "$work/grub.cfg" /EFI/debian/grub.cfg
fi

# The root partition: ext4 in place.
root_kib=$(((root_end - root_start + 1) / 2))
populate=()
if [[ -n "$root_dir" ]]; then
    populate=(-d "$root_dir")
fi
mkfs.ext4 -F -q -L root "${populate[@]}" -E "offset=$((root_start * 512))" "$image" "${root_kib}k" ||
    die "mkfs.ext4 failed on $image"

sgdisk --verify "$image" | grep -q "No problems found" || die "sgdisk --verify found problems in $image"
mv -f "$image" "$output"
echo "build-efi-disk: $output ($(du -h --apparent-size "$output" | cut -f1) sparse, $(du -h "$output" | cut -f1) allocated)"
echo "build-efi-disk: partition 1 ESP at sector $esp_start, partition 2 root at sector $root_start"
