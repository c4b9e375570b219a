//! Links both probe binaries from `link.ld`: the PVH flavour with the whole
//! script, the linux64 flavour without the `pvh-only` lines (no PT_NOTE),
//! each with its own ELF entry point.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=link.ld");
    let script = match std::fs::read_to_string("link.ld") {
        Ok(script) => script,
        Err(err) => {
            println!("cargo:warning=cannot read link.ld: {err}");
            std::process::exit(1);
        }
    };
    let linux64: String = script
        .lines()
        .filter(|line| !line.contains("pvh-only"))
        .map(|line| format!("{line}\n"))
        .collect();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_else(|| ".".into()));
    let pvh_path = out.join("link-pvh.ld");
    let linux64_path = out.join("link-linux64.ld");
    for (path, text) in [
        (&pvh_path, script.as_str()),
        (&linux64_path, linux64.as_str()),
    ] {
        if let Err(err) = std::fs::write(path, text) {
            println!("cargo:warning=cannot write {}: {err}", path.display());
            std::process::exit(1);
        }
    }
    println!(
        "cargo:rustc-link-arg-bin=probe-pvh=-T{}",
        pvh_path.display()
    );
    println!("cargo:rustc-link-arg-bin=probe-pvh=--entry=pvh_start32");
    println!(
        "cargo:rustc-link-arg-bin=probe-linux64=-T{}",
        linux64_path.display()
    );
    println!("cargo:rustc-link-arg-bin=probe-linux64=--entry=linux64_start");
    println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
}
