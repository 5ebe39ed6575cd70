//! The FUSE adapter: inodes, attributes, reads and seeks over the catalog.
//! Read-only; requests are served by several threads (fuser's worker loops).

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};
use tracing::{debug, error};

use crate::catalog::{Catalog, Content, Ino, Node};
use crate::view::{self, View};

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The tree never changes while mounted, so the kernel may cache names and
/// attributes for long.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Largest read the kernel is asked to send (max_pages 256 with 4 KiB pages).
pub const MAX_READ: u32 = 1 << 20;

/// What the command line overrides of the files' owner, group and
/// permission bits (by default, those of the image each file comes from).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: u16,
}

pub struct SnapFs {
    catalog: Arc<Catalog>,
    owner: Ownership,
}

impl SnapFs {
    pub fn new(catalog: Arc<Catalog>, owner: Ownership) -> Self {
        SnapFs { catalog, owner }
    }

    fn attr(&self, ino: Ino, node: &Node) -> FileAttr {
        let dir = matches!(node.content, Content::Dir(_));
        FileAttr {
            ino: INodeNo(ino),
            size: node.size(),
            blocks: node.allocated().div_ceil(512),
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.mtime,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: node.perm & !self.owner.umask,
            nlink: if dir { 2 } else { 1 },
            uid: self.owner.uid.unwrap_or(node.uid),
            gid: self.owner.gid.unwrap_or(node.gid),
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }
}

impl Filesystem for SnapFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for 1 MiB requests; the kernel may cap these lower.
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_write(MAX_READ);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.catalog.lookup(parent.0, name) {
            Some(ino) => {
                let node = self.catalog.node(ino).expect("catalog children exist");
                reply.entry(&TTL, &self.attr(ino, node), Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.catalog.node(ino.0) {
            Some(node) => reply.attr(&TTL, &self.attr(ino.0, node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(node) = self.catalog.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if matches!(node.content, Content::Dir(_)) {
            return reply.error(Errno::EISDIR);
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Images held under QEMU's locks do not change under the mount: let
        // the page cache keep what it has across opens. Under --force-share
        // a view that may change is read around the page cache, so that
        // every read reaches its change check.
        match &node.content {
            Content::View(v) if v.may_change() => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            _ => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(node) = self.catalog.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let len = node.size().saturating_sub(offset).min(size as u64) as usize;
        match &node.content {
            Content::Dir(_) => reply.error(Errno::EISDIR),
            Content::Bytes(b) => reply.data(slice(b, offset, len)),
            Content::Lazy(l) => reply.data(slice(l.bytes(), offset, len)),
            // Uncompressed data in a local file goes from its page cache to
            // the reader in one copy: the kernel copies the reply from the
            // mapping (this process never touches those bytes).
            Content::View(v) if len >= MAP_AT_LEAST => match v.mapped(offset, len) {
                Some(mapped) => reply.data(mapped),
                None => read_view(v.as_ref(), offset, len, reply),
            },
            Content::View(v) => read_view(v.as_ref(), offset, len, reply),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(node) = self.catalog.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Content::Dir(children) = &node.content else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots =
            [(ino.0, FileType::Directory, OsStr::new(".")), (node.parent, FileType::Directory, OsStr::new(".."))];
        let entries = dots.into_iter().chain(children.iter().map(|(name, &child)| {
            let kind = match self.catalog.node(child).map(|n| &n.content) {
                Some(Content::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (child, kind, name.as_os_str())
        }));
        for (i, (child, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let Some(node) = self.catalog.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Ok(from) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        let found = match (&node.content, whence) {
            (Content::View(v), libc::SEEK_DATA) => view::seek_data(v.as_ref(), from),
            (Content::View(v), libc::SEEK_HOLE) => view::seek_hole(v.as_ref(), from),
            (Content::Bytes(_) | Content::Lazy(_), libc::SEEK_DATA) => Ok((from < node.size()).then_some(from)),
            (Content::Bytes(_) | Content::Lazy(_), libc::SEEK_HOLE) => Ok((from < node.size()).then_some(node.size())),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(Some(pos)) => reply.offset(pos as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => {
                error!("seek at {from:#x} failed: {e}");
                reply.error(Errno::EIO);
            }
        }
    }

    // Nothing is ever written, so there is nothing to flush or sync: answer
    // at once (a loop mount flushes on every close; fuser's defaults would
    // log a warning each time).
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.catalog.total_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.catalog.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        debug!("access {ino:?} {mask:?}");
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }
}

/// Smaller reads are copied: asking whether a range is in the page cache
/// costs a system call, about what copying a few pages does.
const MAP_AT_LEAST: usize = 64 << 10;

/// Answers a read of a view from a buffer it fills.
fn read_view(v: &dyn View, offset: u64, len: usize, reply: ReplyData) {
    READ_BUF.with(|cell| {
        // Each FUSE worker reuses one buffer: no allocation (and no page
        // faults) per request.
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        match v.read_at(&mut buf[..len], offset) {
            Ok(()) => reply.data(&buf[..len]),
            Err(e) => {
                error!("read of {len} bytes at {offset:#x} failed: {e}");
                reply.error(Errno::from_i32(e.errno()));
            }
        }
    })
}

fn slice(bytes: &[u8], offset: u64, len: usize) -> &[u8] {
    let start = offset.min(bytes.len() as u64) as usize;
    &bytes[start..(start + len).min(bytes.len())]
}
