//! Link settings for the Xen PVH image (`unikernel-xen`), and nothing else:
//! host builds and tests of the library are untouched.
//!
//! The image is a static, freestanding, non-PIE ELF laid out by `linker.ld`
//! (see shared/xenlab/RUST-PVH.md for why each flag is needed: rustc passes
//! `-pie` for the default PIC model and the later `-no-pie` wins; the build id
//! and 64 KiB page alignment would waste space and break reproducibility).

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_string());
    let script = format!("{manifest_dir}/linker.ld");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=src/platform/xen/boot.s");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,norelro",
        "-Wl,--no-dynamic-linker",
    ] {
        println!("cargo:rustc-link-arg-bin=unikernel-xen={arg}");
    }
    println!("cargo:rustc-link-arg-bin=unikernel-xen=-Wl,-T,{script}");
    // The linker map, next to the image (OUT_DIR is <target>/<profile>/
    // build/unikernel-<hash>/out): each function's address, for
    // symbolising exception reports of the stripped image (traps.rs). It
    // does not change the image's bytes.
    if let Ok(out_dir) = std::env::var("OUT_DIR") {
        println!(
            "cargo:rustc-link-arg-bin=unikernel-xen=-Wl,-Map={out_dir}/../../../unikernel-xen.map"
        );
    }
}
