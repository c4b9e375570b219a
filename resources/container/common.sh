# Shared by build-initramfs.sh and make-rootfs.sh (sourced, not run): Debian
# package downloads and busybox applet links.
# shellcheck shell=bash

container_cache="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/cache/container"

# Prints $1 on stderr, prefixed with the calling script's name, and exits 1.
die() {
    echo "$(basename "$0" .sh): $1" >&2
    exit 1
}

# Downloads the Debian packages $2... and extracts them all into $1.
fetch_debs() {
    local dest=$1 debs deb
    shift
    command -v apt-get >/dev/null || die "needs apt-get (a Debian or Ubuntu host)"
    debs=$(mktemp -d)
    if ! (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$@" >/dev/null 2>&1); then
        apt-get update -qq >/dev/null 2>&1 || true
        (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$@" >/dev/null) ||
            { rm -rf "$debs"; die "cannot download the Debian packages $*"; }
    fi
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$dest"
    done
    rm -rf "$debs"
}

# Prints the path of Debian's static busybox, cached in
# resources/cache/container/busybox after the first download.
cached_busybox() {
    local bin="$container_cache/busybox" tmp
    if [[ ! -x "$bin" ]]; then
        mkdir -p "$container_cache"
        tmp=$(mktemp -d)
        fetch_debs "$tmp" busybox-static
        # A rename, so concurrent builds never see a partial binary.
        mv "$tmp/bin/busybox" "$bin.$$" && mv "$bin.$$" "$bin"
        rm -rf "$tmp"
    fi
    echo "$bin"
}

# Installs busybox $1 as $2/bin/busybox with a relative symbolic link for
# each applet (keeping any file already at a link's path, and /sbin/init).
install_busybox() {
    local busybox=$1 root=$2 applet up
    mkdir -p "$root/bin"
    cp "$busybox" "$root/bin/busybox.new" && mv "$root/bin/busybox.new" "$root/bin/busybox"
    chmod 755 "$root/bin/busybox"
    "$busybox" --list-full | while read -r applet; do
        [[ "$applet" == */* && "$applet" != sbin/init ]] || continue
        [[ -e "$root/$applet" || -L "$root/$applet" ]] && continue
        up=$(dirname "$applet" | sed 's|[^/]*|..|g')
        mkdir -p "$root/$(dirname "$applet")"
        ln -s "$up/bin/busybox" "$root/$applet"
    done
}
