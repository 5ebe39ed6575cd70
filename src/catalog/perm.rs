//! Who may read what the mount serves: the owner, group and read bits of the
//! image file a node comes from, narrowed by every other file its views read.
//!
//! The rule is that nobody reads through the mount what they could not read
//! without it. A view of an image reads the image and also its backing chain
//! and data files (or an archive's parents), so a class (owner, group,
//! others) keeps its read bit only if that class could read every one of
//! those files. Write bits are never set; search bits follow read bits on
//! directories.

use crate::io::Source;

/// Owner, group and read bits (a subset of 0o444) for an image's nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub uid: u32,
    pub gid: u32,
    pub read: u16,
}

impl Access {
    /// For an image whose views read `top` and `others` (backing files,
    /// data files, parent archives).
    pub fn of<'a>(top: &Source, others: impl IntoIterator<Item = &'a Source>) -> Access {
        let (uid, gid) = top.owner();
        let mut read = (top.mode() & 0o444) as u16;
        for f in others {
            let (fuid, fgid) = f.owner();
            let mode = f.mode();
            // The owner class: what `uid` gets on f. Root reads anything.
            let owner_reads = uid == 0
                || match (fuid == uid, fgid == gid) {
                    (true, _) => mode & 0o400 != 0,
                    (false, true) => mode & 0o040 != 0,
                    (false, false) => mode & 0o004 != 0,
                };
            // The group class: a member of `gid` (not f's owner) gets f's
            // group bits when f has that group, else f's others bits.
            let group_reads = if fgid == gid { mode & 0o040 != 0 } else { mode & 0o004 != 0 };
            let others_read = mode & 0o004 != 0;
            if !owner_reads {
                read &= !0o400;
            }
            if !group_reads {
                read &= !0o040;
            }
            if !others_read {
                read &= !0o004;
            }
        }
        Access { uid, gid, read }
    }

    /// The permission bits of a node whose own bits are `perm`: read bits
    /// only where the image allows them, search/execute bits only where read
    /// is allowed, special bits kept (the mount is nosuid), no write bits.
    pub fn narrow(&self, perm: u16) -> u16 {
        let allowed = self.read | (self.read >> 2) | 0o7000;
        perm & allowed & !0o222
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_keeps_only_what_the_image_allows() {
        let a = Access { uid: 1, gid: 1, read: 0o440 };
        assert_eq!(a.narrow(0o555), 0o550);
        assert_eq!(a.narrow(0o444), 0o440);
        assert_eq!(a.narrow(0o4755), 0o4550);
        let private = Access { uid: 1, gid: 1, read: 0o400 };
        assert_eq!(private.narrow(0o555), 0o500);
        assert_eq!(private.narrow(0o644), 0o400);
    }
}
