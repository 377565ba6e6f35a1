//! The request path as authorization rules see it and the app receives it: without its query,
//! percent-encoded unreserved characters decoded and dot-segments removed (RFC 3986 §6.2.2, as
//! Envoy's `normalize_path` does for Istio), so that `/./admin`, `/a/../admin` and `/%61dmin`
//! are all `/admin` to a rule about `/admin` and to the app behind it. Double slashes are kept,
//! as Istio's default keeps them.

use std::borrow::Cow;

/// A request's path (without its query), normalized; borrowed when it already was.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let decoded = decode_unreserved(path);
    if !has_dot_segment(&decoded) {
        return decoded;
    }
    Cow::Owned(remove_dot_segments(&decoded))
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex(byte: u8) -> Option<u8> {
    char::from(byte).to_digit(16).map(|d| d as u8)
}

/// `%61` → `a`; any other escape is kept as written.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let decodable = |i: usize| {
        let (Some(&high), Some(&low)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
            return None;
        };
        let byte = hex(high)? * 16 + hex(low)?;
        is_unreserved(byte).then_some(byte)
    };
    if !(0..bytes.len()).any(|i| bytes[i] == b'%' && decodable(i).is_some()) {
        return Cow::Borrowed(path);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], decodable(i)) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    // Only ASCII bytes were replaced by ASCII bytes: still UTF-8.
    Cow::Owned(String::from_utf8(out).expect("ASCII replaced by ASCII"))
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// RFC 3986 §5.2.4, on segments.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." | ".." => {
                if *segment == ".." && out.len() > 1 {
                    out.pop();
                }
                // A trailing dot-segment leaves a directory: `/a/b/..` is `/a/`.
                if i == last {
                    out.push("");
                }
            }
            segment => out.push(segment),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn dot_segments_and_unreserved_escapes_are_resolved() {
        for (raw, normal) in [
            ("/", "/"),
            ("/admin", "/admin"),
            ("/./admin", "/admin"),
            ("/a/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/./b/.", "/a/b/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a%2Fb", "/a%2Fb"),
            ("//admin", "//admin"),
            ("/a/..%2fadmin", "/a/..%2fadmin"),
            ("/100%", "/100%"),
            ("/%zz", "/%zz"),
        ] {
            assert_eq!(normalize(raw), normal, "{raw}");
        }
    }
}
