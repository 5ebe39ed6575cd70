//! Turns the sources named on the command line into the tree the mount shows:
//!
//! ```text
//! <image>/disk.raw, info.json
//! <image>/snapshots/<entry>/disk.raw, vmstate, info.json
//! <image>/backing/<n>-<file name>/disk.raw, info.json
//! ```
//!
//! The tree is built once, before mounting, and never changes: the images are
//! read-only and assumed not to change while mounted.

mod info;
pub mod names;
mod perm;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use tracing::{info, warn};

use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::format::hexz::{self, HexzArchive, PasswordSource, Stream};
use crate::format::qcow2::{Backing, Qcow2Image};
use crate::format::{self, Format};
use crate::io::{remote, OpenRules, Source};
use crate::partition;
use crate::tree::Tree;
use crate::view::{self, SliceView, View};

use perm::Access;

pub use info::rfc3339;

pub type Ino = u64;

/// Snapshots of one image whose partition tables are read at mount.
const MAX_PROBED_SNAPSHOTS: usize = 64;
/// Extents walked at most to count a file's allocated bytes (a second or so).
const MAX_WALK_STEPS: u64 = 1 << 20;
pub const ROOT: Ino = 1;

pub enum Content {
    Dir(BTreeMap<OsString, Ino>),
    View(Arc<dyn View>),
    Bytes(Arc<[u8]>),
    /// Bytes made on first use (e.g. statistics that need a whole index walk).
    Lazy(Lazy),
}

pub struct Lazy {
    make: Box<dyn Fn() -> Vec<u8> + Send + Sync>,
    bytes: OnceLock<Arc<[u8]>>,
}

impl Lazy {
    pub fn bytes(&self) -> &Arc<[u8]> {
        self.bytes.get_or_init(|| (self.make)().into())
    }
}

pub struct Node {
    pub parent: Ino,
    pub content: Content,
    /// Permission bits (read-only: never any write bit).
    pub perm: u16,
    /// Owner and group: those of the image file the node comes from.
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Bytes holding data, computed on first `stat` (views walk their maps).
    allocated: OnceLock<u64>,
}

impl Node {
    pub fn size(&self) -> u64 {
        match &self.content {
            Content::Dir(_) => 0,
            Content::View(v) => v.size(),
            Content::Bytes(b) => b.len() as u64,
            Content::Lazy(l) => l.bytes().len() as u64,
        }
    }

    /// Bytes the file really takes: data extents for views (zeros and
    /// unallocated ranges take none). When the map cannot be walked (damage,
    /// or too many runs), the whole size: claiming holes that are not there
    /// would make `tar --sparse` and `cp --sparse` drop data.
    pub fn allocated(&self) -> u64 {
        *self.allocated.get_or_init(|| match &self.content {
            Content::Dir(_) => 0,
            Content::Bytes(b) => b.len() as u64,
            Content::Lazy(l) => l.bytes().len() as u64,
            Content::View(v) => match view::allocated_bytes(v.as_ref(), MAX_WALK_STEPS) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => v.size(),
                Err(e) => {
                    warn!("cannot compute allocated size, reporting it as fully allocated: {e}");
                    v.size()
                }
            },
        })
    }
}

pub struct Catalog {
    nodes: Vec<Node>,
    /// Opened only to be described (`snapmount info`): a disk that cannot
    /// be read then (an encrypted one) has its partitions left out quietly.
    describe_only: bool,
}

type Times = (SystemTime, SystemTime, SystemTime);

impl Catalog {
    pub fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        match &self.node(parent)?.content {
            Content::Dir(children) => children.get(name).copied(),
            _ => None,
        }
    }

    /// The node at a `/`-separated path below the root (`vm.qcow2/disk.raw`).
    pub fn resolve(&self, path: &str) -> Option<Ino> {
        path.split('/').filter(|p| !p.is_empty()).try_fold(ROOT, |ino, part| self.lookup(ino, OsStr::new(part)))
    }

    /// Names of a directory's entries, in order.
    pub fn children(&self, ino: Ino) -> Vec<String> {
        match self.node(ino).map(|n| &n.content) {
            Some(Content::Dir(c)) => c.keys().map(|k| k.to_string_lossy().into_owned()).collect(),
            _ => Vec::new(),
        }
    }

    /// Sum of the sizes of the views, for statfs.
    pub fn total_bytes(&self) -> u64 {
        let views = self.nodes.iter().filter_map(|n| match &n.content {
            Content::View(v) => Some(v.size()),
            _ => None,
        });
        views.fold(0u64, u64::saturating_add)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// Opens every source (an image, or a directory whose images are all
    /// taken) and lays out the tree. Any image that cannot be opened fails the
    /// whole build, so nothing half-works.
    pub fn build(
        sources: &[PathBuf],
        cache: &Arc<BlockCache>,
        passwords: PasswordSource,
        rules: &OpenRules,
    ) -> Result<Catalog> {
        let now = SystemTime::now();
        let mut cat = Catalog { nodes: Vec::new(), describe_only: rules.describe_only };
        cat.add(0, None, Content::Dir(BTreeMap::new()), (now, now, now));
        for source in sources {
            let source = &if remote::is_url(source) {
                source.clone()
            } else {
                // Absolute, but not through symlinks: relative backing names
                // resolve against the path the user gave, as QEMU does.
                std::path::absolute(source).map_err(|e| Error::io(source, e))?
            };
            if let Some(paths) = folder(source, rules)? {
                let mut found = 0;
                for path in paths {
                    let file = match Source::open(&path, rules) {
                        Ok(f) => f,
                        Err(e) => {
                            info!("skipping {}: {e}", path.display());
                            continue;
                        }
                    };
                    match format::probe(&file)? {
                        Some(fmt) => {
                            cat.add_image(&path, fmt, cache, passwords, rules)?;
                            found += 1;
                        }
                        None => {
                            info!("skipping {}: not an image snapmount reads (unknown magic bytes)", path.display())
                        }
                    }
                }
                if found == 0 {
                    warn!("{}: no images in this directory", source.display());
                }
            } else {
                let file = Source::open(source, rules)?;
                match format::probe(&file)? {
                    Some(fmt) => cat.add_image(source, fmt, cache, passwords, rules)?,
                    None => {
                        return Err(Error::open(
                            source,
                            "not a qcow2/qcow image, HEXZ archive or VeridianOS snapshot or migration stream \
                             (unknown magic bytes)",
                        ))
                    }
                }
            }
        }
        Ok(cat)
    }

    fn add(&mut self, parent: Ino, name: Option<&str>, content: Content, times: Times) -> Ino {
        let ino = self.nodes.len() as Ino + 1;
        let perm = if matches!(content, Content::Dir(_)) { 0o555 } else { 0o444 };
        // SAFETY: plain getters. The root directory belongs to whoever
        // mounts; an image's nodes get its owner in `add_image`.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        self.nodes.push(Node {
            parent: if parent == 0 { ino } else { parent },
            perm,
            uid,
            gid,
            content,
            atime: times.0,
            mtime: times.1,
            ctime: times.2,
            allocated: OnceLock::new(),
        });
        if let Some(name) = name {
            if let Content::Dir(children) = &mut self.nodes[parent as usize - 1].content {
                children.insert(name.into(), ino);
            }
        }
        ino
    }

    fn dir(&mut self, parent: Ino, name: &str, times: Times) -> Ino {
        self.add(parent, Some(name), Content::Dir(BTreeMap::new()), times)
    }

    /// A name for an image's directory not yet used in the root: the file
    /// name, then `<file name>~2`, `~3`, ...
    fn unique_root_name(&self, path: &Path) -> String {
        let base = match remote::display_name(path) {
            Some(name) => name,
            None => path.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_else(|| b"image".to_vec()),
        };
        let base = names::escape(&base);
        let taken = |n: &str| self.lookup(ROOT, OsStr::new(n)).is_some();
        if !taken(&base) {
            return base;
        }
        (2..).map(|i| format!("{base}~{i}")).find(|n| !taken(n)).unwrap()
    }

    fn add_image(
        &mut self,
        path: &Path,
        fmt: Format,
        cache: &Arc<BlockCache>,
        passwords: PasswordSource,
        rules: &OpenRules,
    ) -> Result<()> {
        let first = self.nodes.len();
        let access;
        match fmt {
            Format::Qcow2 => {
                let image = format::open_qcow2_with(path, cache, passwords, rules)?;
                access = qcow2_access(&image);
                let name = self.unique_root_name(path);
                let times = image.file().times();
                let dir = self.dir(ROOT, &name, times);
                self.add_qcow2(dir, &image, times);
            }
            Format::VeridianSnapshot | Format::VeridianMigration => {
                let file = Arc::new(Source::open_image(path, rules)?);
                let tree = match fmt {
                    Format::VeridianSnapshot => format::veridian::vmsn::open(file.clone())?,
                    _ => format::veridian::migration::open(file.clone())?,
                };
                access = Access::of(&file, []);
                let name = self.unique_root_name(path);
                let times = file.times();
                let dir = self.dir(ROOT, &name, times);
                self.add_tree(dir, tree, times);
            }
            Format::Hexz => {
                let archive = hexz::open_hexz(path, cache, passwords, rules)?;
                access = hexz_access(&archive);
                let name = self.unique_root_name(path);
                let times = archive.file().times();
                let dir = self.dir(ROOT, &name, times);
                self.add_hexz(dir, &archive, times);
                let ancestors = hexz_ancestors(&archive);
                if !ancestors.is_empty() {
                    let bdir = self.dir(dir, "backing", times);
                    for (n, parent) in ancestors.iter().enumerate() {
                        let file_name =
                            parent.path().file_name().map(|f| f.as_encoded_bytes().to_vec()).unwrap_or_default();
                        let ptimes = parent.file().times();
                        let pdir = self.dir(bdir, &format!("{}-{}", n + 1, names::escape(&file_name)), ptimes);
                        self.add_hexz(pdir, parent, ptimes);
                    }
                }
            }
        }
        // Everything this image added takes its owner and read bits.
        for node in &mut self.nodes[first..] {
            node.uid = access.uid;
            node.gid = access.gid;
            node.perm = access.narrow(node.perm);
        }
        Ok(())
    }

    /// disk.raw, auxiliary.raw, files/ and info.json of one archive.
    fn add_hexz(&mut self, dir: Ino, archive: &Arc<HexzArchive>, times: Times) {
        let main: Arc<dyn View> = Arc::new(archive.view(Stream::Main));
        self.add(dir, Some("disk.raw"), Content::View(main.clone()), times);
        let partitions = self.add_partitions(dir, &main, &archive.path().display().to_string(), times);
        let aux: Option<Arc<dyn View>> =
            archive.has_auxiliary().then(|| Arc::new(archive.view(Stream::Auxiliary)) as Arc<dyn View>);
        if let Some(aux) = &aux {
            self.add(dir, Some("auxiliary.raw"), Content::View(aux.clone()), times);
        }
        let a = archive.clone();
        let make = move || {
            let mut v = info::hexz_info(&a);
            v["partitions"] = partitions.clone();
            info::json_text(&v)
        };
        self.add(dir, Some("info.json"), Content::Lazy(Lazy { make: Box::new(make), bytes: OnceLock::new() }), times);
        if let Some(manifest) = archive.manifest() {
            let files = self.dir(dir, "files", times);
            for entry in &manifest.files {
                let Some(parts) = safe_components(&entry.path) else {
                    warn!("{}: skipping manifest entry with unsafe path {:?}", archive.path().display(), entry.path);
                    continue;
                };
                // hexz puts a top-level file named `memory` in the auxiliary stream.
                let view: Arc<dyn View> = match (&aux, entry.path.as_str()) {
                    (Some(aux), "memory") => Arc::new(SliceView::new(aux.clone(), 0, entry.size)),
                    _ => Arc::new(SliceView::new(main.clone(), entry.offset, entry.size)),
                };
                let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(entry.mtime.max(0) as u64);
                let ftimes = (when, when, when);
                let mut parent = files;
                for part in &parts[..parts.len() - 1] {
                    parent = match self.lookup(parent, OsStr::new(part)) {
                        Some(ino) if matches!(self.nodes[ino as usize - 1].content, Content::Dir(_)) => ino,
                        Some(_) => break,
                        None => self.dir(parent, part, times),
                    };
                }
                let leaf = parts[parts.len() - 1];
                if self.lookup(parent, OsStr::new(leaf)).is_some() {
                    warn!("{}: duplicate manifest entry {:?} skipped", archive.path().display(), entry.path);
                    continue;
                }
                let ino = self.add(parent, Some(leaf), Content::View(view), ftimes);
                let perm = if entry.mode == 0 { 0o444 } else { (entry.mode & 0o7555) as u16 };
                self.nodes[ino as usize - 1].perm = perm;
            }
        }
    }

    /// disk.raw, info.json, snapshots/ and backing/ of one qcow2 image.
    fn add_qcow2(&mut self, dir: Ino, image: &Arc<Qcow2Image>, times: Times) {
        let entries = snapshot_entries(image);
        let what = image.path().display().to_string();
        let active: Arc<dyn View> = Arc::new(image.active_view());
        self.add(dir, Some("disk.raw"), Content::View(active.clone()), times);
        let mut info = info::qcow2_info(image, &entries);
        info["partitions"] = self.add_partitions(dir, &active, &what, times);
        self.add(dir, Some("info.json"), json_bytes(&info), times);

        if image.snapshots().len() > MAX_PROBED_SNAPSHOTS {
            info!(
                "{what}: {} snapshots; partition tables are shown for the first {MAX_PROBED_SNAPSHOTS} only",
                image.snapshots().len()
            );
        }
        if !image.snapshots().is_empty() {
            let snapdir = self.dir(dir, "snapshots", times);
            for (index, (snap, entry)) in image.snapshots().iter().zip(&entries).enumerate() {
                let when = info::snapshot_time(snap);
                let stimes = (when, when, when);
                let sdir = self.dir(snapdir, entry, stimes);
                let disk: Arc<dyn View> = Arc::new(image.snapshot_view(index));
                self.add(sdir, Some("disk.raw"), Content::View(disk.clone()), stimes);
                // Probing reads each snapshot's L1 table, which otherwise
                // waits for the snapshot's first read: bounded, so that an
                // image with thousands of snapshots (hostile or not) mounts
                // in bounded time.
                let partitions = if index < MAX_PROBED_SNAPSHOTS {
                    self.add_partitions(sdir, &disk, &format!("{what} snapshot {entry}"), stimes)
                } else {
                    serde_json::Value::Null
                };
                if snap.vm_state_size > 0 {
                    self.add(sdir, Some("vmstate"), Content::View(Arc::new(image.vmstate_view(index))), stimes);
                }
                let mut sinfo = info::snapshot_info(snap);
                sinfo["entry"] = serde_json::json!(entry);
                sinfo["partitions"] = partitions;
                self.add(sdir, Some("info.json"), json_bytes(&sinfo), stimes);
            }
        }

        if image.backing().is_some() {
            let bdir = self.dir(dir, "backing", times);
            let mut link: Option<&Backing> = image.backing();
            let mut n = 1;
            while let Some(b) = link {
                let file_name = b.path.file_name().map(|f| f.as_encoded_bytes().to_vec()).unwrap_or_default();
                let name = format!("{n}-{}", names::escape(&file_name));
                let btimes = b.file.times();
                let ldir = self.dir(bdir, &name, btimes);
                self.add(ldir, Some("disk.raw"), Content::View(b.view.clone()), btimes);
                let partitions = self.add_partitions(ldir, &b.view, &b.path.display().to_string(), btimes);
                let mut binfo = match &b.image {
                    Some(img) => info::qcow2_info(img, &snapshot_entries(img)),
                    None => info::raw_info(&b.path, b.view.size()),
                };
                binfo["partitions"] = partitions;
                self.add(ldir, Some("info.json"), json_bytes(&binfo), btimes);
                link = b.image.as_ref().and_then(|i| i.backing());
                n += 1;
            }
        }
    }
}

impl Catalog {
    /// Lays out a format's tree under `dir`.
    fn add_tree(&mut self, dir: Ino, tree: Tree, times: Times) {
        let Tree::Dir(entries) = tree else { return };
        for (name, entry) in entries {
            match entry {
                Tree::Dir(_) => {
                    let sub = self.dir(dir, &name, times);
                    self.add_tree(sub, entry, times);
                }
                Tree::View(v) => {
                    self.add(dir, Some(&name), Content::View(v), times);
                }
                Tree::Bytes(b) => {
                    self.add(dir, Some(&name), Content::Bytes(b.into()), times);
                }
                Tree::Lazy(make) => {
                    self.add(dir, Some(&name), Content::Lazy(Lazy { make, bytes: OnceLock::new() }), times);
                }
            }
        }
    }

    /// `partitions/N.raw` beside the disk view `disk` in `dir`, one slice
    /// view per partition of its table (sharing the disk's cache), and their
    /// list for info.json. `what` names the disk in log lines.
    fn add_partitions(&mut self, dir: Ino, disk: &Arc<dyn View>, what: &str, times: Times) -> serde_json::Value {
        let found = match partition::read(disk.as_ref(), what) {
            Ok(found) => found,
            Err(_) if self.describe_only => Vec::new(),
            Err(e) => {
                warn!("{what}: cannot read its partition table: {e}");
                Vec::new()
            }
        };
        if !found.is_empty() {
            let pdir = self.dir(dir, "partitions", times);
            for p in &found {
                let view = Arc::new(SliceView::new(disk.clone(), p.start, p.size));
                self.add(pdir, Some(&p.file_name()), Content::View(view), times);
            }
        }
        serde_json::Value::Array(found.iter().map(|p| p.to_json()).collect())
    }
}

/// Who may read an image's nodes: see `perm`.
fn qcow2_access(image: &Qcow2Image) -> Access {
    let mut others: Vec<&Source> = image.own_files().into_iter().skip(1).map(|f| f.as_ref()).collect();
    let mut link = image.backing();
    while let Some(b) = link {
        match &b.image {
            Some(img) => others.extend(img.own_files().into_iter().map(|f| f.as_ref())),
            None => others.push(&b.file),
        }
        link = b.image.as_ref().and_then(|i| i.backing());
    }
    Access::of(image.file(), others)
}

fn hexz_access(archive: &Arc<HexzArchive>) -> Access {
    let ancestors = hexz_ancestors(archive);
    Access::of(archive.file(), ancestors.iter().map(|a| a.file().as_ref()))
}

/// The directory entry name of each of an image's snapshots, in table order.
fn snapshot_entries(image: &Qcow2Image) -> Vec<String> {
    let snaps: Vec<(&str, &[u8])> = image.snapshots().iter().map(|s| (s.id.as_str(), s.name.as_slice())).collect();
    names::snapshot_entries(&snaps)
}

fn json_bytes(v: &serde_json::Value) -> Content {
    Content::Bytes(info::json_text(v).into())
}

/// Parents, grandparents, ... of an archive, nearest first, each once.
fn hexz_ancestors(archive: &Arc<HexzArchive>) -> Vec<Arc<HexzArchive>> {
    let mut out: Vec<Arc<HexzArchive>> = Vec::new();
    let mut todo: Vec<Arc<HexzArchive>> = archive.parents().iter().rev().map(|(_, p)| p.clone()).collect();
    while let Some(a) = todo.pop() {
        if out.iter().any(|x| Arc::ptr_eq(x, &a)) {
            continue;
        }
        todo.extend(a.parents().iter().rev().map(|(_, p)| p.clone()));
        out.push(a);
    }
    out
}

/// The components of a manifest path, or `None` if it is not a plain
/// relative path (empty, absolute, `.`/`..`, NUL, overlong components).
fn safe_components(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let ok = !parts.is_empty()
        && !path.starts_with('/')
        && parts.iter().all(|p| *p != "." && *p != ".." && !p.contains('\0') && p.len() <= 255);
    ok.then_some(parts)
}

/// Regular files directly inside `dir`, sorted by name so directory names
/// (and their `~N` suffixes) are stable from mount to mount.
/// The files of a folder source (a local directory, or an S3 prefix ending
/// in '/'), or `None` for a single image.
fn folder(source: &Path, rules: &OpenRules) -> Result<Option<Vec<PathBuf>>> {
    if remote::is_url(source) {
        if !remote::Location::parse(source)?.is_prefix() {
            return Ok(None);
        }
        let remote = rules.remote.as_ref().ok_or_else(|| Error::open(source, "remote sources are not enabled here"))?;
        return remote.list(source).map(Some);
    }
    if std::fs::metadata(source).map_err(|e| Error::io(source, e))?.is_dir() {
        return list_dir(source).map(Some);
    }
    Ok(None)
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.is_file() {
            out.push(path);
        } else {
            info!("skipping {}: not a regular file", path.display());
        }
    }
    out.sort();
    Ok(out)
}
