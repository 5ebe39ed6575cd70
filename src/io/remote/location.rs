//! Where a remote object is: an HTTP(S) URL or an S3 bucket and key, and
//! how a name written inside a remote image resolves against it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether `path` is a URL snapmount reads remotely (`http://`, `https://`,
/// `s3://`) rather than a local path.
pub fn is_url(path: &Path) -> bool {
    let s = path.as_os_str().as_encoded_bytes();
    ["http://", "https://", "s3://"]
        .iter()
        .any(|p| s.len() > p.len() && s[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// `scheme://authority/path[?query]`, the fragment dropped.
    Http { scheme: String, authority: String, path: String, query: Option<String> },
    /// An S3 object (or, with a key ending in '/', a prefix). Keys are taken
    /// literally, as the AWS CLI does.
    S3 { bucket: String, key: String },
}

impl Location {
    pub fn parse(url: &Path) -> Result<Location> {
        let bad = |why: &str| Error::open(url, why.to_string());
        let text = url.to_str().ok_or_else(|| bad("a URL must be UTF-8"))?;
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("not a URL"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "s3" {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("an s3:// URL needs a bucket: s3://BUCKET/KEY"));
            }
            return Ok(Location::S3 { bucket: bucket.to_string(), key: key.to_string() });
        }
        if scheme != "http" && scheme != "https" {
            return Err(bad("only http://, https:// and s3:// URLs are read"));
        }
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        if authority.is_empty() || authority.contains('@') {
            return Err(bad(
                "an HTTP URL needs a host (and no user:password@: credentials never go on the command line)",
            ));
        }
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (tail, None),
        };
        let path = if path.is_empty() { "/".to_string() } else { encode_path(path) };
        Ok(Location::Http { scheme, authority: authority.to_string(), path, query })
    }

    /// The URL, as the user would write it.
    pub fn url(&self) -> String {
        match self {
            Location::Http { scheme, authority, path, query } => match query {
                Some(q) => format!("{scheme}://{authority}{path}?{q}"),
                None => format!("{scheme}://{authority}{path}"),
            },
            Location::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }

    /// Whether this names a set of objects (an S3 prefix ending in '/', or
    /// the whole bucket) rather than one.
    pub fn is_prefix(&self) -> bool {
        match self {
            Location::S3 { key, .. } => key.is_empty() || key.ends_with('/'),
            Location::Http { path, .. } => path.ends_with('/'),
        }
    }

    /// The last segment of the path or key (percent-decoded for HTTP): the
    /// object's directory name in the mount.
    pub fn name(&self) -> Vec<u8> {
        match self {
            Location::Http { path, .. } => percent_decode(path.rsplit('/').next().unwrap_or("")),
            Location::S3 { key, .. } => key.rsplit('/').next().unwrap_or("").as_bytes().to_vec(),
        }
    }

    /// The location of `name`, written inside the image at `self`: relative
    /// names against the image's "directory" (RFC 3986 for HTTP; the key up
    /// to its last '/' for S3, with `.` and `..` segments normalized); an
    /// absolute URL only on the same server or bucket. Anything that would
    /// leave the remote side (an absolute local path, another scheme,
    /// `json:`) is refused: a remote file must never make snapmount open a
    /// local file, nor lend the mount's credentials to another bucket.
    pub fn join(&self, name: &str) -> std::result::Result<Location, String> {
        if name.starts_with("json:") {
            return Err("is a json: name, which a remote image may not use".into());
        }
        if name.starts_with('/') {
            return Err("is an absolute local path, which a remote image may not name (--backing-map maps it)".into());
        }
        // QEMU's rule: a ':' before any '/' makes it a protocol.
        if name.find(':').is_some_and(|c| !name[..c].contains('/')) {
            let other = Location::parse(Path::new(name))
                .map_err(|_| "names a protocol other than this image's (--backing-map maps it)".to_string())?;
            let same = match (self, &other) {
                (Location::Http { scheme: a, authority: b, .. }, Location::Http { scheme: c, authority: d, .. }) => {
                    a == c && b.eq_ignore_ascii_case(d)
                }
                (Location::S3 { bucket: a, .. }, Location::S3 { bucket: b, .. }) => a == b,
                _ => false,
            };
            if !same {
                return Err("names another server or bucket than this image's (--backing-map maps it)".into());
            }
            return Ok(other);
        }
        match self {
            Location::Http { scheme, authority, path, .. } => {
                let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
                let (name, query) = match name.split_once('?') {
                    Some((n, q)) => (n, Some(q.to_string())),
                    None => (name, None),
                };
                let joined = normalize(&format!("{dir}{}", encode_path(name)))
                    .ok_or("climbs above the server's root with '..'")?;
                Ok(Location::Http { scheme: scheme.clone(), authority: authority.clone(), path: joined, query })
            }
            Location::S3 { bucket, key } => {
                let dir = &key[..key.rfind('/').map_or(0, |i| i + 1)];
                let joined = normalize(&format!("/{dir}{name}")).ok_or("climbs above the bucket with '..'")?;
                Ok(Location::S3 { bucket: bucket.clone(), key: joined[1..].to_string() })
            }
        }
    }
}

/// The URL of `name` written inside the remote image `image` (see
/// `Location::join`), or a refusal naming both.
pub fn resolve(image: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let base = Location::parse(image)?;
    match base.join(name) {
        Ok(loc) => Ok(PathBuf::from(loc.url())),
        Err(why) => Err(Error::open(image, format!("{what} '{name}' {why}"))),
    }
}

/// Removes `.` and `..` segments from an absolute path (RFC 3986 5.2.4);
/// `None` when `..` would climb above the root.
fn normalize(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop()?;
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// Percent-encodes what may not stand in a URL path (spaces, non-ASCII,
/// `?`, `#`, controls); an existing `%XX` is kept, as QEMU and curl do.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(base: &str, name: &str) -> std::result::Result<String, String> {
        Location::parse(Path::new(base)).unwrap().join(name).map(|l| l.url())
    }

    #[test]
    fn http_names_resolve_as_rfc_3986_says() {
        // RFC 3986 section 5.4.1, with base http://a/b/c/d;p?q.
        let base = "http://a/b/c/d;p?q";
        for (name, want) in [
            ("g", "http://a/b/c/g"),
            ("./g", "http://a/b/c/g"),
            ("g/", "http://a/b/c/g/"),
            ("g?y", "http://a/b/c/g?y"),
            ("g;x", "http://a/b/c/g;x"),
            (".", "http://a/b/c/"),
            ("./", "http://a/b/c/"),
            ("..", "http://a/b/"),
            ("../", "http://a/b/"),
            ("../g", "http://a/b/g"),
            ("../..", "http://a/"),
            ("../../g", "http://a/g"),
            ("http://a/x/y", "http://a/x/y"),
        ] {
            assert_eq!(join(base, name).as_deref(), Ok(want), "{name}");
        }
        assert!(join(base, "../../../g").is_err());
        assert_eq!(join("http://h/img/top.qcow2", "my disk.qcow2").unwrap(), "http://h/img/my%20disk.qcow2");
        assert_eq!(join("http://h/img/top.qcow2", "../base/b.qcow2").unwrap(), "http://h/base/b.qcow2");
    }

    #[test]
    fn s3_keys_are_literal_and_normalized() {
        assert_eq!(join("s3://b/vm/top.qcow2", "base.qcow2").unwrap(), "s3://b/vm/base.qcow2");
        assert_eq!(join("s3://b/vm/x/top.qcow2", "../base/a b.qcow2").unwrap(), "s3://b/vm/base/a b.qcow2");
        assert_eq!(join("s3://b/top.qcow2", "./base.qcow2").unwrap(), "s3://b/base.qcow2");
        assert!(join("s3://b/top.qcow2", "../base.qcow2").is_err());
        assert_eq!(join("s3://b/vm/top.qcow2", "s3://b/other/base").unwrap(), "s3://b/other/base");
    }

    #[test]
    fn names_that_leave_the_remote_side_are_refused() {
        for base in ["http://h/a/top.qcow2", "s3://b/a/top.qcow2"] {
            for name in [
                "/etc/shadow",
                "json:{\"file\":\"/etc/shadow\"}",
                "file:///etc/shadow",
                "nbd://h/x",
                "s3://other/x",
                "http://other/x",
                "https://h/a/x",
            ] {
                assert!(join(base, name).is_err(), "{base} {name}");
            }
        }
    }

    #[test]
    fn names_in_the_mount() {
        let name = |u: &str| Location::parse(Path::new(u)).unwrap().name();
        assert_eq!(name("http://h/a/my%20disk.qcow2?sig=1"), b"my disk.qcow2");
        assert_eq!(name("s3://b/vm/disk 1.qcow2"), b"disk 1.qcow2");
        assert_eq!(name("s3://b/vm/%41"), b"%41");
        assert!(Location::parse(Path::new("s3://b/vm/")).unwrap().is_prefix());
        assert!(Location::parse(Path::new("http://user:pw@h/x")).is_err());
        assert!(is_url(Path::new("HTTPS://h/x")) && !is_url(Path::new("http:/x")) && !is_url(Path::new("./s3://x")));
    }
}
