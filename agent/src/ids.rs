//! VM ids and names: generated, validated, and never trusted as paths.

use std::io::Read;

use vmlet_protocol::{ApiError, ErrorCode};

/// Length of a VM id in hex characters.
pub const ID_LEN: usize = 16;

/// A fresh random VM id: 16 lowercase hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; ID_LEN / 2];
    // /dev/urandom never blocks and never runs dry once the host booted.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `s` has the form of an id (the only thing ever used in a path).
pub fn is_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Checks a user-chosen VM name: `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}`.
pub fn validate_name(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!(
                "invalid name {:?}: use 1 to 64 of [a-zA-Z0-9_.-], starting with a letter or digit",
                truncate(s)
            ),
        ))
    }
}

/// Checks a reference to a VM (id, id prefix or name) before it is looked
/// up, so that nothing with a slash, a dot-dot or a control character ever
/// gets near the state directory or the logs.
pub fn validate_ref(s: &str) -> Result<(), ApiError> {
    validate_name(s).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            format!("invalid VM reference {:?}", truncate(s)),
        )
    })
}

/// Checks an image reference: a name (`repo[:tag]`, the repo possibly
/// with a registry host and `/` paths), a `sha256:` id or an id prefix:
/// `[a-z0-9][a-zA-Z0-9_.:/@-]{0,254}`, no `..`. Image names are never used
/// as paths (the store keys everything by digest); the check keeps control
/// characters and absurd lengths out of records and logs.
pub fn validate_image(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && (s.as_bytes()[0].is_ascii_lowercase() || s.as_bytes()[0].is_ascii_digit())
        && !s.contains("..")
        && !s.contains("//")
        && s.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b':' | b'/' | b'@')
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("invalid image name {:?}", truncate(s)),
        ))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_and_valid() {
        let a = new_id();
        let b = new_id();
        assert!(is_id(&a) && is_id(&b));
        assert_ne!(a, b);
        assert!(!is_id("../../etc/passwd"));
        assert!(!is_id("ABCDEF0123456789"));
    }

    #[test]
    fn names_and_refs_reject_escapes() {
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            "/abs",
            ".hidden",
            "a\0b",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
            assert!(validate_ref(bad).is_err(), "{bad:?}");
        }
        for good in ["web", "a.b-c_d", "0abc", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn images() {
        assert!(validate_image("busybox").is_ok());
        assert!(validate_image("busybox:latest").is_ok());
        assert!(validate_image("localhost:5000/test/img:v1").is_ok());
        for bad in [
            "",
            "../busybox",
            "a//b",
            "Busybox",
            "a..b",
            ".x",
            "/abs",
            "a b",
        ] {
            assert!(validate_image(bad).is_err(), "{bad:?}");
        }
    }
}
