//! `cargo xtask image [--check-reproducible]`: builds the firewall's Xen PVH
//! image (`unikernel-xen`, feature `xen`) with the stable host toolchain,
//! checks the ELF the way Xen's loader needs it, copies it to
//! `target/xen/qubes-firewall.elf` (under `$CARGO_TARGET_DIR` when set),
//! with its linker map as `qubes-firewall.map` (addresses to functions, for
//! `tests/xen/symbolize.sh`), and prints its size.
//!
//! The build uses its own cargo profile (`xen-image`: release, `opt-level =
//! "s"`, no debug info, stripped) given with `--config`, so it neither
//! changes the workspace profiles nor shares artifacts with other release
//! builds. `--check-reproducible` builds a second time in a separate target
//! directory and requires the same bytes. The ELF check must never pass an
//! image Xen would misload: a PHYS32_ENTRY note must be present and no TLS,
//! INTERP, DYNAMIC or GNU_RELRO segment may exist.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_command, workspace_root};

const PROFILE: &str = "xen-image";
const PROFILE_CONFIG: [&str; 5] = [
    "profile.xen-image.inherits=\"release\"",
    "profile.xen-image.opt-level=\"s\"",
    "profile.xen-image.debug=false",
    "profile.xen-image.strip=true",
    "profile.xen-image.lto=true",
];

pub fn run(args: &[String]) -> Result<(), String> {
    let check = match args {
        [] => false,
        [flag] if flag == "--check-reproducible" => true,
        _ => return Err("usage: cargo xtask image [--check-reproducible]".to_string()),
    };
    let root = workspace_root();
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let built = build(&root, &target_dir)?;
    let bytes =
        std::fs::read(&built).map_err(|e| format!("cannot read {}: {e}", built.display()))?;
    check_elf(&bytes).map_err(|e| format!("{}: {e}", built.display()))?;
    let out_dir = target_dir.join("xen");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let out = out_dir.join("qubes-firewall.elf");
    std::fs::write(&out, &bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    // The linker map (unikernel/build.rs) names the code at each address of
    // this stripped image: tests/xen/symbolize.sh reads it.
    let map = built.with_file_name("unikernel-xen.map");
    if map.exists() {
        let to = out_dir.join("qubes-firewall.map");
        std::fs::copy(&map, &to).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    }
    println!(
        "xtask image: {} ({} bytes, {} KiB)",
        out.display(),
        bytes.len(),
        bytes.len().div_ceil(1024)
    );
    if check {
        let second = build(&root, &target_dir.join("xen-reproducible"))?;
        let again =
            std::fs::read(&second).map_err(|e| format!("cannot read {}: {e}", second.display()))?;
        if again != bytes {
            return Err(format!(
                "the image is not reproducible: {} and {} differ",
                built.display(),
                second.display()
            ));
        }
        println!(
            "xtask image: a second build in {} gave the same {} bytes",
            second.display(),
            again.len()
        );
    }
    Ok(())
}

pub fn build(root: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let mut command = Command::new("cargo");
    command.current_dir(root).arg("build");
    for config in PROFILE_CONFIG {
        command.args(["--config", config]);
    }
    command
        .args([
            "--profile",
            PROFILE,
            "-p",
            "unikernel",
            "--features",
            "xen",
            "--bin",
            "unikernel-xen",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    run_command(&mut command)?;
    Ok(target_dir.join(PROFILE).join("unikernel-xen"))
}

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const PT_TLS: u32 = 7;
const PT_GNU_RELRO: u32 = 0x6474_e552;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Checks that `elf` is a static x86-64 executable Xen can boot as PVH.
/// Returns the PHYS32 entry address.
pub fn check_elf(elf: &[u8]) -> Result<u32, String> {
    let short = || "truncated ELF".to_string();
    if elf.get(..4) != Some(b"\x7fELF".as_slice())
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
    {
        return Err("not a little-endian ELF64 file".to_string());
    }
    if u16_at(elf, 16).ok_or_else(short)? != 2 {
        return Err("not an EXEC (static, non-PIE) ELF".to_string());
    }
    if u16_at(elf, 18).ok_or_else(short)? != 62 {
        return Err("not an x86-64 ELF".to_string());
    }
    let phoff = u64_at(elf, 32).ok_or_else(short)? as usize;
    let phentsize = u16_at(elf, 54).ok_or_else(short)? as usize;
    let phnum = u16_at(elf, 56).ok_or_else(short)? as usize;
    if phentsize < 56 {
        return Err("program header entries too small".to_string());
    }
    let mut entry = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = u32_at(elf, ph).ok_or_else(short)?;
        match kind {
            PT_DYNAMIC => return Err("has a DYNAMIC segment".to_string()),
            PT_INTERP => return Err("has an INTERP segment".to_string()),
            PT_TLS => return Err("has a TLS segment".to_string()),
            PT_GNU_RELRO => return Err("has a GNU_RELRO segment".to_string()),
            PT_NOTE => {
                let offset = u64_at(elf, ph + 8).ok_or_else(short)? as usize;
                let size = u64_at(elf, ph + 32).ok_or_else(short)? as usize;
                let notes = elf.get(offset..offset + size).ok_or_else(short)?;
                entry = entry.or(find_phys32_entry(notes));
            }
            _ => {}
        }
    }
    entry.ok_or_else(|| "no Xen PHYS32_ENTRY note (type 18, name \"Xen\")".to_string())
}

fn find_phys32_entry(notes: &[u8]) -> Option<u32> {
    let mut at = 0;
    while at + 12 <= notes.len() {
        let namesz = u32_at(notes, at)? as usize;
        let descsz = u32_at(notes, at + 4)? as usize;
        let kind = u32_at(notes, at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at + namesz.div_ceil(4) * 4;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY
            && notes.get(name_at..name_at + namesz) == Some(b"Xen\0".as_slice())
            && descsz >= 4
        {
            return u32_at(notes, desc_at);
        }
        at = desc_at + descsz.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 EXEC with the given program headers (type, note bytes).
    fn elf(segments: &[(u32, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let data_start = 64 + 56 * segments.len();
        let mut data = Vec::new();
        for (kind, bytes) in segments {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&((data_start + data.len()) as u64).to_le_bytes());
            ph[32..40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            b.extend_from_slice(&ph);
            data.extend_from_slice(bytes);
        }
        b.extend_from_slice(&data);
        b
    }

    fn note(kind: u32, name: &[u8], desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn accepts_a_pvh_image_and_finds_the_entry() {
        let mut notes = note(1, b"GNU\0", &[0; 16]);
        notes.extend(note(18, b"Xen\0", &0x10_0000u32.to_le_bytes()));
        assert_eq!(
            check_elf(&elf(&[(1, &[]), (PT_NOTE, &notes)])),
            Ok(0x10_0000)
        );
    }

    #[test]
    fn refuses_what_xen_cannot_boot() {
        let good = note(18, b"Xen\0", &0x10_0000u32.to_le_bytes());
        for bad in [PT_TLS, PT_INTERP, PT_DYNAMIC, PT_GNU_RELRO] {
            assert!(
                check_elf(&elf(&[(PT_NOTE, &good), (bad, &[])])).is_err(),
                "{bad:#x}"
            );
        }
        assert!(check_elf(&elf(&[(PT_NOTE, &note(18, b"Xe\0", &[0; 4]))])).is_err());
        assert!(check_elf(&elf(&[(PT_NOTE, &note(17, b"Xen\0", &[0; 4]))])).is_err());
        assert!(check_elf(&elf(&[])).is_err());
        let mut pie = elf(&[(PT_NOTE, &good)]);
        pie[16] = 3;
        assert!(check_elf(&pie).is_err());
        assert!(check_elf(b"\x7fELF").is_err());
        // A note header claiming a huge size must not panic.
        let mut huge = elf(&[(PT_NOTE, &good)]);
        let len = huge.len();
        huge[len - 20..len - 16].copy_from_slice(&u32::MAX.to_le_bytes());
        let _ = check_elf(&huge);
    }

    /// Guards the real image: builds it (in its own target directory, so
    /// this does not wait on the lock of the `cargo test` that runs it) and
    /// checks the ELF Xen will load.
    #[test]
    fn the_real_image_passes_the_check() {
        let root = workspace_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root.join("target"), PathBuf::from)
            .join("xen-elf-guard");
        let image = build(&root, &target).unwrap();
        let bytes = std::fs::read(&image).unwrap();
        let entry = check_elf(&bytes).unwrap();
        assert!(
            (0x10_0000..0x20_0000).contains(&entry),
            "entry {entry:#x} outside the first MiB after 1 MiB"
        );
    }
}
