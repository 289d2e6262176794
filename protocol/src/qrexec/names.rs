//! The rules qrexec-daemon applies to names a VM sends: qube names, service
//! names (`name+argument`) and request idents.
//!
//! Exactly as `daemon/qrexec-daemon.c` applies them: `sanitize_name` replaces
//! every byte outside `[A-Za-z0-9_.-]` plus the extra characters (`@:` for
//! qube names, `+` for service names) by `_`; `validate_service_name` refuses
//! an empty name or one starting with `+`; `validate_request_id` allows only
//! `[A-Za-z0-9_.- ]`, needs a NUL inside the 32 bytes and only NULs after it.
//! From `libqrexec/exec.c`: the service part before `+` is 1..=255 bytes
//! (`NAME_MAX`) and the whole descriptor at most `MAX_SERVICE_NAME_LEN`.
//! These functions only judge and rewrite bytes in place; they must never
//! allocate, and never let a byte outside the allowed sets through.

use core::fmt;

use super::{IDENT_LEN, MAX_SERVICE_NAME_LEN};

/// Longest service name part (before `+`) a qube can execute (`NAME_MAX`).
pub const MAX_SERVICE_PART_LEN: usize = 255;

/// Why a name or ident is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// The service name is empty.
    EmptyServiceName,
    /// The service name starts with `+` (no service part).
    ServiceNameStartsWithPlus,
    /// The part before `+` is longer than 255 bytes.
    ServicePartTooLong {
        /// Its length.
        len: usize,
    },
    /// The whole service descriptor is too long.
    ServiceNameTooLong {
        /// Its length.
        len: usize,
    },
    /// A request ident byte outside `[A-Za-z0-9_.- ]`.
    BadRequestIdByte {
        /// The byte.
        byte: u8,
        /// Its offset.
        offset: usize,
    },
    /// A non-NUL byte after the request ident's terminator.
    RequestIdTrailingGarbage {
        /// Offset of the non-NUL byte.
        offset: usize,
        /// Offset of the terminator.
        terminator: usize,
    },
    /// The request ident has no NUL terminator within 32 bytes.
    RequestIdNotTerminated,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NameError::EmptyServiceName => f.write_str("Empty service name not allowed"),
            NameError::ServiceNameStartsWithPlus => {
                f.write_str("Service name must not start with '+'")
            }
            NameError::ServicePartTooLong { len } => write!(
                f,
                "Service path too long to execute: {len} (at most {MAX_SERVICE_PART_LEN} before '+')"
            ),
            NameError::ServiceNameTooLong { len } => write!(
                f,
                "service name of {len} bytes is too long (at most {})",
                MAX_SERVICE_NAME_LEN - 1
            ),
            NameError::BadRequestIdByte { byte, offset } => {
                write!(f, "Bad byte {byte} at offset {offset} in request ident")
            }
            NameError::RequestIdTrailingGarbage { offset, terminator } => write!(
                f,
                "Non-NUL byte at offset {offset} follows NUL terminator at offset {terminator} in request ident"
            ),
            NameError::RequestIdNotTerminated => f.write_str("No NUL terminator in request ident"),
        }
    }
}

impl core::error::Error for NameError {}

/// Whether `byte` may stay in a name that allows `extra` beyond the base set
/// `[A-Za-z0-9_.-]`.
pub fn is_allowed_name_byte(byte: u8, extra: &[u8]) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.') || extra.contains(&byte)
}

/// Qubes' `sanitize_name`: replace every disallowed byte by `_`, up to the
/// first NUL.
pub fn sanitize_name(name: &mut [u8], extra: &[u8]) {
    for byte in name.iter_mut() {
        if *byte == 0 {
            break;
        }
        if !is_allowed_name_byte(*byte, extra) {
            *byte = b'_';
        }
    }
}

/// Sanitise a qube (target/source) name: base set plus `@` and `:`.
pub fn sanitize_qube_name(name: &mut [u8]) {
    sanitize_name(name, b"@:");
}

/// Sanitise a service name: base set plus `+`.
pub fn sanitize_service_name(name: &mut [u8]) {
    sanitize_name(name, b"+");
}

/// Qubes' `validate_service_name` (before sanitising): non-empty and not
/// starting with `+`.
pub fn validate_service_name(name: &[u8]) -> Result<(), NameError> {
    match name.first() {
        None | Some(0) => Err(NameError::EmptyServiceName),
        Some(b'+') => Err(NameError::ServiceNameStartsWithPlus),
        Some(_) => Ok(()),
    }
}

/// Qubes' `validate_request_id`: returns the ident without its NULs.
pub fn validate_request_id(ident: &[u8; IDENT_LEN]) -> Result<&[u8], NameError> {
    for (offset, &byte) in ident.iter().enumerate() {
        if byte == 0 {
            if let Some(extra) = ident
                .iter()
                .enumerate()
                .skip(offset + 1)
                .find(|(_, b)| **b != 0)
            {
                return Err(NameError::RequestIdTrailingGarbage {
                    offset: extra.0,
                    terminator: offset,
                });
            }
            return Ok(ident.get(..offset).unwrap_or(&[]));
        }
        if !is_allowed_name_byte(byte, b" ") {
            return Err(NameError::BadRequestIdByte { byte, offset });
        }
    }
    Err(NameError::RequestIdNotTerminated)
}

/// A service descriptor split at the first `+`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceDescriptor<'a> {
    /// The whole descriptor (`name+argument` or `name`).
    pub full: &'a [u8],
    /// The service name before `+`.
    pub name: &'a [u8],
    /// The argument after `+` (`None` when there is no `+`; `Some(b"")` for a
    /// trailing `+`).
    pub argument: Option<&'a [u8]>,
}

/// Split `name+argument` and check the lengths a qube will execute: the name
/// part 1..=255 bytes, the whole descriptor below `MAX_SERVICE_NAME_LEN`.
pub fn split_service_descriptor(full: &[u8]) -> Result<ServiceDescriptor<'_>, NameError> {
    if full.len() >= MAX_SERVICE_NAME_LEN {
        return Err(NameError::ServiceNameTooLong { len: full.len() });
    }
    let (name, argument) = match full.iter().position(|&b| b == b'+') {
        Some(plus) => (
            full.get(..plus).unwrap_or(&[]),
            Some(full.get(plus + 1..).unwrap_or(&[])),
        ),
        None => (full, None),
    };
    if name.is_empty() {
        return Err(if full.is_empty() {
            NameError::EmptyServiceName
        } else {
            NameError::ServiceNameStartsWithPlus
        });
    }
    if name.len() > MAX_SERVICE_PART_LEN {
        return Err(NameError::ServicePartTooLong { len: name.len() });
    }
    Ok(ServiceDescriptor {
        full,
        name,
        argument,
    })
}

/// Qubes' `target_refers_to_dom0`: `@adminvm`, `dom0` or dom0's UUID.
pub fn target_refers_to_dom0(target: &[u8]) -> bool {
    matches!(
        target,
        b"@adminvm" | b"dom0" | b"uuid:00000000-0000-0000-0000-000000000000"
    )
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    fn ident(s: &[u8]) -> [u8; IDENT_LEN] {
        let mut raw = [0u8; IDENT_LEN];
        raw[..s.len()].copy_from_slice(s);
        raw
    }

    #[test]
    fn qube_names_are_sanitised() {
        let mut name = *b"work/../x y@dispvm:a\xff;";
        sanitize_qube_name(&mut name);
        assert_eq!(&name, b"work_.._x_y@dispvm:a__");
        let mut stop = *b"a b\0c d";
        sanitize_qube_name(&mut stop);
        assert_eq!(&stop, b"a_b\0c d");
    }

    #[test]
    fn service_names_are_sanitised() {
        let mut name = *b"qubes.Filecopy+a/b:c@d e";
        sanitize_service_name(&mut name);
        assert_eq!(&name, b"qubes.Filecopy+a_b_c_d_e");
    }

    #[test]
    fn service_name_validation() {
        assert_eq!(validate_service_name(b""), Err(NameError::EmptyServiceName));
        assert_eq!(
            validate_service_name(b"+arg"),
            Err(NameError::ServiceNameStartsWithPlus)
        );
        assert_eq!(validate_service_name(b"a+"), Ok(()));
    }

    #[test]
    fn request_id_rules() {
        assert_eq!(
            validate_request_id(&ident(b"SOCKET11")),
            Ok(&b"SOCKET11"[..])
        );
        assert_eq!(
            validate_request_id(&ident(b"a b.c-d_e")),
            Ok(&b"a b.c-d_e"[..])
        );
        assert_eq!(validate_request_id(&ident(b"")), Ok(&b""[..]));
        assert_eq!(
            validate_request_id(&ident(b"a/b")),
            Err(NameError::BadRequestIdByte {
                byte: b'/',
                offset: 1
            })
        );
        let mut garbage = ident(b"ab");
        garbage[10] = b'x';
        assert_eq!(
            validate_request_id(&garbage),
            Err(NameError::RequestIdTrailingGarbage {
                offset: 10,
                terminator: 2
            })
        );
        assert_eq!(
            validate_request_id(&[b'a'; IDENT_LEN]),
            Err(NameError::RequestIdNotTerminated)
        );
    }

    #[test]
    fn descriptor_split_and_limits() {
        let d = split_service_descriptor(b"test.File+testfile1").unwrap();
        assert_eq!(d.name, b"test.File");
        assert_eq!(d.argument, Some(&b"testfile1"[..]));
        let d = split_service_descriptor(b"test.Add").unwrap();
        assert_eq!(d.argument, None);
        let d = split_service_descriptor(b"test.Add+").unwrap();
        assert_eq!(d.argument, Some(&b""[..]));
        assert_eq!(
            split_service_descriptor(b"+x"),
            Err(NameError::ServiceNameStartsWithPlus)
        );
        assert_eq!(
            split_service_descriptor(b""),
            Err(NameError::EmptyServiceName)
        );
        let long = [b'a'; 256];
        assert_eq!(
            split_service_descriptor(&long),
            Err(NameError::ServicePartTooLong { len: 256 })
        );
        assert!(split_service_descriptor(&long[..255]).is_ok());
    }

    #[test]
    fn dom0_targets() {
        assert!(target_refers_to_dom0(b"dom0"));
        assert!(target_refers_to_dom0(b"@adminvm"));
        assert!(target_refers_to_dom0(
            b"uuid:00000000-0000-0000-0000-000000000000"
        ));
        assert!(!target_refers_to_dom0(b"dom01"));
        assert!(!target_refers_to_dom0(b"@anyvm"));
    }
}
