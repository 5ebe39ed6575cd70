//! Confinement: a file named inside an image (backing file, external data
//! file, HEXZ parent) is opened only if the image's owner could read it.
//!
//! snapmount usually runs as root, and anyone who owns an image can write any
//! name into it. Without this rule, a user could name `/etc/shadow` as the
//! backing file of their own image and read it through the mount. The check
//! walks the name the way the kernel resolves a path (every directory on the
//! way needs search permission, symlinks are followed with their targets
//! checked the same way), as the image's owner and group, with the classic
//! permission bits (no ACLs, no capabilities): the owner class if the uid
//! matches, else the group class if the gid matches, else the others.
//! Root-owned images may name anything.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::FileId;

/// Symlinks followed at most while resolving one name (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Why the check failed.
#[derive(Debug)]
pub enum Denied {
    /// The file, or a directory on the way, does not exist.
    NotFound(PathBuf),
    /// `(uid, gid)` may not search or read this path.
    NoPermission { path: PathBuf, search: bool },
    /// Too many symlinks, or another error from the system.
    Other(String),
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::NotFound(p) => write!(f, "{} does not exist", p.display()),
            Denied::NoPermission { path, search: true } => write!(f, "no search permission on {}", path.display()),
            Denied::NoPermission { path, search: false } => write!(f, "no read permission on {}", path.display()),
            Denied::Other(msg) => f.write_str(msg),
        }
    }
}

/// Whether a process with only `uid` and `gid` could open `path` (absolute)
/// for reading. Returns the file's real path and identity when it could: the
/// caller opens the file and compares identities, so that a path changed
/// between the check and the open is caught.
pub fn readable_as(uid: u32, gid: u32, path: &Path) -> Result<(PathBuf, FileId), Denied> {
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, path);
    let mut dir = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop() {
        // Looking up any name in a directory, `..` included, needs search
        // permission on it.
        let meta = stat(&dir, |p| std::fs::metadata(p))?;
        if !allowed(uid, gid, &meta, 0o1) {
            return Err(Denied::NoPermission { path: dir, search: true });
        }
        if name == ".." {
            dir.pop();
            continue;
        }
        let next = dir.join(&name);
        let meta = stat(&next, |p| std::fs::symlink_metadata(p))?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(Denied::Other(format!("too many symlinks resolving {}", path.display())));
            }
            let target = std::fs::read_link(&next).map_err(|e| Denied::Other(format!("{}: {e}", next.display())))?;
            if target.is_absolute() {
                dir = PathBuf::from("/");
            }
            push_components(&mut todo, &target);
            continue;
        }
        if !todo.is_empty() && !meta.is_dir() {
            return Err(Denied::Other(format!("{} is not a directory", next.display())));
        }
        dir = next;
    }
    let meta = stat(&dir, |p| std::fs::metadata(p))?;
    if !allowed(uid, gid, &meta, 0o4) {
        return Err(Denied::NoPermission { path: dir, search: false });
    }
    Ok((dir, FileId { dev: meta.dev(), ino: meta.ino() }))
}

/// Pushes the components of `path` onto the stack `todo` so that the first
/// component is popped first; `.` and the root are dropped.
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

fn stat(path: &Path, f: impl Fn(&Path) -> io::Result<std::fs::Metadata>) -> Result<std::fs::Metadata, Denied> {
    f(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Denied::NotFound(path.to_path_buf()),
        _ => Denied::Other(format!("{}: {e}", path.display())),
    })
}

/// The classic permission check for one class of bits (`want`: 4 read, 1 search).
fn allowed(uid: u32, gid: u32, meta: &std::fs::Metadata, want: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let mode = meta.mode();
    let bits = if meta.uid() == uid {
        mode >> 6
    } else if meta.gid() == gid {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Runs as whoever runs the tests; uses a uid and gid that own nothing,
    /// so only the "others" bits apply to them.
    #[test]
    fn others_bits_decide_for_a_stranger() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().canonicalize().unwrap();
        chmod(&d, 0o755);
        let (u, g) = (54321, 54321);
        std::fs::write(d.join("open"), b"x").unwrap();
        chmod(&d.join("open"), 0o644);
        std::fs::write(d.join("secret"), b"x").unwrap();
        chmod(&d.join("secret"), 0o600);
        std::fs::create_dir(d.join("closed")).unwrap();
        std::fs::write(d.join("closed/f"), b"x").unwrap();
        chmod(&d.join("closed/f"), 0o644);
        chmod(&d.join("closed"), 0o700);
        symlink(d.join("secret"), d.join("link-to-secret")).unwrap();
        symlink("closed/../open", d.join("rel-link")).unwrap();
        symlink("loop", d.join("loop")).unwrap();

        assert_eq!(readable_as(u, g, &d.join("open")).unwrap().0, d.join("open"));
        assert!(matches!(readable_as(u, g, &d.join("secret")), Err(Denied::NoPermission { search: false, .. })));
        assert!(matches!(readable_as(u, g, &d.join("closed/f")), Err(Denied::NoPermission { search: true, .. })));
        // `..` out of a directory one cannot search is refused, as the kernel does.
        assert!(readable_as(u, g, &d.join("closed/../open")).is_err());
        assert!(matches!(readable_as(u, g, &d.join("link-to-secret")), Err(Denied::NoPermission { .. })));
        assert!(readable_as(u, g, &d.join("rel-link")).is_err());
        assert!(matches!(readable_as(u, g, &d.join("loop")), Err(Denied::Other(_))));
        assert!(matches!(readable_as(u, g, &d.join("missing")), Err(Denied::NotFound(_))));
        // The group class applies when the gid matches and the uid does not.
        let file_gid = std::fs::metadata(d.join("open")).unwrap().gid();
        chmod(&d.join("secret"), 0o640);
        assert!(readable_as(u, file_gid, &d.join("secret")).is_ok());
        chmod(&d.join("secret"), 0o604);
        assert!(readable_as(u, file_gid, &d.join("secret")).is_err(), "group bits decide for the group, not others'");
        // Root may read anything.
        assert!(readable_as(0, 0, &d.join("closed/f")).is_ok());
    }
}
