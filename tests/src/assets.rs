//! Guest assets from Debian packages, fetched on first use by
//! `resources/fetch-debian-assets.sh` into `resources/cache/debian/`.

use std::path::PathBuf;
use std::process::Command;

use crate::zvmm::workspace_root;

/// A file from `resources/cache/debian/`, fetching the packages first if
/// it is not there yet.
pub fn debian_asset(name: &str) -> PathBuf {
    let root = workspace_root();
    let path = root.join("resources/cache/debian").join(name);
    if !path.exists() {
        let status = Command::new("bash")
            .arg(root.join("resources/fetch-debian-assets.sh"))
            .status()
            .expect("cannot run resources/fetch-debian-assets.sh");
        assert!(status.success(), "fetching the Debian packages failed");
    }
    assert!(path.exists(), "{} missing after fetching", path.display());
    path
}

/// The Debian cloud kernel (bzImage).
pub fn debian_bzimage() -> PathBuf {
    debian_asset("vmlinuz")
}
