//! Fuzzes the `qubes.OpenInVM` handler's input (`vm-file-editor`): the
//! 256-byte name field and the contents. Any byte stream must be accepted or
//! refused without panicking; an accepted file lies directly in the private
//! directory under a name of `[0-9A-Za-z._+@-]` only, holds exactly the
//! bytes after the field, and nothing ever appears outside that directory;
//! a refused one leaves the directory empty.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qubes_filecopy::openinvm::{NAME_FIELD_LEN, receive_request};

fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("qubes-openinvm-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&base);
        base
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let dir = base.join("private");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("create the private directory");
    let mut input = data;
    let result = receive_request(&mut input, &dir, 4096);
    let inside: Vec<_> = std::fs::read_dir(&dir)
        .expect("list the private directory")
        .flatten()
        .map(|e| e.path())
        .collect();
    match result {
        Ok(received) => {
            assert_eq!(inside, vec![received.path.clone()]);
            let name = received.path.file_name().expect("a file name");
            let name = name.to_str().expect("an ASCII name");
            assert!(name != "." && name != ".." && !name.is_empty());
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+@-".contains(&b)));
            let body = data.get(NAME_FIELD_LEN..).unwrap_or_default();
            assert_eq!(std::fs::read(&received.path).expect("read it back"), body);
        }
        Err(_) => assert!(inside.is_empty(), "left after a refusal: {inside:?}"),
    }
    let outside: Vec<_> = std::fs::read_dir(base)
        .expect("list the fuzz directory")
        .flatten()
        .map(|e| e.file_name())
        .filter(|name| name != "private")
        .collect();
    assert!(outside.is_empty(), "written outside the private directory: {outside:?}");
});
