//! What /proc/self/mountinfo says about a path.

use std::path::Path;

/// The filesystem type mounted at `path` (the topmost mount there), or
/// `None` if nothing is mounted on it. `path` must be absolute, with its
/// symlinks resolved, as the kernel lists it.
pub fn fs_type(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The kernel escapes these characters in mount points as octal.
    let want = path
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (fields.get(4) == Some(&want.as_str())).then(|| fields.get(sep + 1).map(|t| t.to_string()))?
    })
}
