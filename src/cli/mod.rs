//! The `snapmount` command line: argument parsing and the commands.

mod daemon;
mod export;
mod info;
pub mod log;
mod mountinfo;
mod password;
mod size;
mod umount;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use size::parse_size;

/// Default bound of the block cache.
pub const DEFAULT_CACHE: &str = "512M";

#[derive(Parser, Debug)]
#[command(name = "snapmount", version, about = "Mount VM disk images and their snapshots read-only as raw disk files")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount images (files, or every image directly inside a directory).
    Mount(MountArgs),
    /// Describe an image or archive without mounting it.
    Info {
        /// The image (qcow2) or archive (HEXZ).
        image: PathBuf,
        /// Print JSON (the same as the mount's info.json).
        #[arg(long)]
        json: bool,
        /// Password file for encrypted images and archives (repeatable;
        /// IMAGE= for one image of a chain).
        #[arg(long, value_name = "[IMAGE=]FILE")]
        password_file: Vec<String>,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Write a view (the disk, or SOURCE@SNAPSHOT) to a raw file, sparse
    /// where the source is unallocated or zero. Needs no FUSE.
    Export {
        /// The image or archive, optionally @ a snapshot (entry name, ID or name).
        source: String,
        /// The raw file to write.
        output: PathBuf,
        /// Password file for encrypted images and archives (repeatable;
        /// IMAGE= for one image of a chain).
        #[arg(long, value_name = "[IMAGE=]FILE")]
        password_file: Vec<String>,
        /// Bound of the block cache.
        #[arg(long, value_name = "SIZE", default_value = DEFAULT_CACHE, value_parser = parse_cache_size)]
        cache_size: u64,
        /// Progress as JSON lines on stderr (done, total, size, seconds),
        /// for scripts; on a terminal a progress line shows anyway.
        #[arg(long)]
        json: bool,
        /// Do not flush the output to disk at the end (by default export
        /// returns only once the file is durable, like `qemu-img convert
        /// -t writeback`).
        #[arg(long)]
        no_sync: bool,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Unmount a snapmount mountpoint (also cleans a stale one).
    #[command(alias = "unmount")]
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
}

/// How image files are opened; shared by mount, info and export.
#[derive(Args, Debug, Default)]
pub struct RuleArgs {
    /// Read images even while a writer (a running VM, qemu-img, qemu-nbd)
    /// holds them, and take no image locks: the active view may change
    /// under the mount (see the man page).
    #[arg(long)]
    pub force_share: bool,
    /// Open backing, data and parent files named inside an image even when
    /// the image's owner could not read them.
    #[arg(long)]
    pub trust_backing: bool,
    /// Open NEW where an image names the backing file or parent OLD
    /// (exactly as written inside it): a path or a URL (repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    pub backing_map: Vec<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// How http://, https:// and s3:// sources are read.
#[derive(Args, Debug, Default)]
pub struct RemoteArgs {
    /// S3 endpoint for s3:// sources, e.g. http://127.0.0.1:8333 (else
    /// AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the profile's endpoint_url;
    /// else AWS). A custom endpoint is addressed path-style.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Trust the PEM root certificates in FILE for HTTPS instead of the
    /// system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Do not verify HTTPS certificates (self-signed test servers only).
    #[arg(long)]
    pub insecure: bool,
    /// How long one read of a remote source keeps retrying (server down,
    /// 5xx, throttled, cut short) before it fails with EIO; the mount stays
    /// up and reads work again once the server is back.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub remote_timeout: u64,
    /// Keep the chunks fetched from remote sources in DIR, across unmounts
    /// and restarts (may be shared by several mounts on this host).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bound of --cache-dir.
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_dir_size: u64,
}

impl RuleArgs {
    /// The rules, with remote sources read through `cache`.
    pub fn rules(
        &self,
        cache: &std::sync::Arc<snapmount::cache::BlockCache>,
    ) -> anyhow::Result<snapmount::io::OpenRules> {
        let mut map = Vec::new();
        for m in &self.backing_map {
            match m.split_once('=') {
                Some((old, new)) if !old.is_empty() && !new.is_empty() => map.push((old.to_string(), new.to_string())),
                _ => anyhow::bail!("--backing-map '{m}': expected OLD=NEW"),
            }
        }
        let r = &self.remote;
        let options = snapmount::io::remote::Options {
            tls: snapmount::io::remote::TlsOptions { ca_file: r.ca_file.clone(), insecure: r.insecure },
            s3_endpoint: r.s3_endpoint.clone(),
            timeout: std::time::Duration::from_secs(r.remote_timeout.max(1)),
            cache_dir: r.cache_dir.clone().map(|d| (d, r.cache_dir_size)),
        };
        Ok(snapmount::io::OpenRules {
            force_share: self.force_share,
            trust_backing: self.trust_backing,
            describe_only: false,
            backing_map: map.into(),
            remote: Some(snapmount::io::remote::Remote::new(options, cache.clone())?),
        })
    }
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Image files or directories of images, then the mountpoint.
    #[arg(required = true, num_args = 2.., value_names = ["SOURCE", "MOUNTPOINT"])]
    pub paths: Vec<PathBuf>,
    /// Stay in the foreground (logs go to stderr).
    #[arg(short, long)]
    pub foreground: bool,
    /// Bound of the block cache of decompressed clusters and tables.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_CACHE, value_parser = parse_cache_size)]
    pub cache_size: u64,
    /// Let other users read the mount (needs user_allow_other in
    /// /etc/fuse.conf when not root).
    #[arg(long)]
    pub allow_other: bool,
    /// FUSE worker threads (default: 2 per CPU, at least 4).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Read the password of encrypted images and archives from this file
    /// (repeatable; with IMAGE=, only for the image of that file name or
    /// path, e.g. one layer of a chain); else SNAPMOUNT_PASSWORD, else a
    /// prompt on the terminal.
    #[arg(long, value_name = "[IMAGE=]FILE")]
    pub password_file: Vec<String>,
    /// Write the daemon's log to this file (in the background; default:
    /// syslog, which journald keeps).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// More detail in the log (-vv for even more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Owner of the files (default: the owner of the image each comes from).
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Group of the files (default: the group of the image each comes from).
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Permission bits to mask off (octal, e.g. 027).
    #[arg(long, value_name = "OCTAL", value_parser = parse_umask)]
    pub umask: Option<u16>,
    #[command(flatten)]
    pub rules: RuleArgs,
    /// Mount options as mount(8) passes them: allow_other, uid=, gid=,
    /// umask=, cache_size=, password_file=, log_file=, threads=,
    /// force_share, trust_backing, backing_map=, s3_endpoint=, ca_file=,
    /// insecure, remote_timeout=, cache_dir=, cache_dir_size=.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
}

fn parse_umask(text: &str) -> Result<u16, String> {
    u16::from_str_radix(text, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| format!("'{text}' is not an octal umask"))
}

/// A cache size, at least the minimum that holds the largest blocks.
pub fn parse_cache_size(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes < snapmount::cache::MIN_CAPACITY {
        return Err(format!("'{text}' is too small; the cache needs at least 16M"));
    }
    Ok(bytes)
}

impl MountArgs {
    /// Folds `-o` options into the typed fields; options mount(8) adds that
    /// mean nothing here are accepted and ignored.
    pub fn apply_options(&mut self) -> anyhow::Result<()> {
        let opts: Vec<String> =
            self.options.iter().flat_map(|o| o.split(',')).filter(|o| !o.is_empty()).map(str::to_string).collect();
        for opt in opts {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            let need = |v: Option<&'_ str>| -> anyhow::Result<String> {
                v.map(str::to_string).ok_or_else(|| anyhow::anyhow!("mount option {key} needs a value ({key}=...)"))
            };
            match key {
                "allow_other" => self.allow_other = true,
                "uid" => self.uid = Some(need(value)?.parse().map_err(|_| anyhow::anyhow!("bad uid in '{opt}'"))?),
                "gid" => self.gid = Some(need(value)?.parse().map_err(|_| anyhow::anyhow!("bad gid in '{opt}'"))?),
                "umask" => self.umask = Some(parse_umask(&need(value)?).map_err(anyhow::Error::msg)?),
                "cache_size" | "cache-size" => {
                    self.cache_size = parse_cache_size(&need(value)?).map_err(anyhow::Error::msg)?
                }
                "password_file" => self.password_file.push(need(value)?),
                "log_file" => self.log_file = Some(need(value)?.into()),
                "threads" => {
                    self.threads =
                        Some(need(value)?.parse().map_err(|_| anyhow::anyhow!("bad thread count in '{opt}'"))?)
                }
                "foreground" => self.foreground = true,
                "force_share" => self.rules.force_share = true,
                "trust_backing" => self.rules.trust_backing = true,
                "backing_map" => self.rules.backing_map.push(need(value)?),
                "s3_endpoint" => self.rules.remote.s3_endpoint = Some(need(value)?),
                "ca_file" => self.rules.remote.ca_file = Some(need(value)?.into()),
                "insecure" => self.rules.remote.insecure = true,
                "remote_timeout" => {
                    self.rules.remote.remote_timeout =
                        need(value)?.parse().map_err(|_| anyhow::anyhow!("bad number of seconds in '{opt}'"))?
                }
                "cache_dir" => self.rules.remote.cache_dir = Some(need(value)?.into()),
                "cache_dir_size" => {
                    self.rules.remote.cache_dir_size = parse_size(&need(value)?).map_err(anyhow::Error::msg)?
                }
                "rw" => tracing::warn!("snapmount mounts are read-only; ignoring 'rw'"),
                // Generic options mount(8) and fstab use; nothing to do here.
                "ro"
                | "defaults"
                | "auto"
                | "noauto"
                | "user"
                | "users"
                | "nouser"
                | "nofail"
                | "_netdev"
                | "nodev"
                | "nosuid"
                | "noexec"
                | "exec"
                | "dev"
                | "suid"
                | "noatime"
                | "atime"
                | "relatime"
                | "nodiratime"
                | "async"
                | "sync"
                | "default_permissions" => {}
                k if k.starts_with("x-") || k.starts_with("comment=") => {}
                _ => anyhow::bail!("unknown mount option '{opt}'"),
            }
        }
        Ok(())
    }
}

/// Runs the command; the error, if any, is one line for the user.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mount(mut args) => {
            args.apply_options()?;
            daemon::mount(args)
        }
        Command::Umount { mountpoint } => umount::umount(&mountpoint),
        Command::Info { image, json, password_file, rules } => {
            info::info(&image, json, &password::PasswordFiles::from_args(&password_file), &rules)
        }
        Command::Export { source, output, password_file, cache_size, json, no_sync, rules } => {
            let passwords = password::PasswordFiles::from_args(&password_file);
            let progress = match (json, std::io::IsTerminal::is_terminal(&std::io::stderr())) {
                (true, _) => export::ProgressMode::Json,
                (false, true) => export::ProgressMode::Terminal,
                (false, false) => export::ProgressMode::Quiet,
            };
            export::export(&source, &output, &passwords, cache_size, &rules, progress, !no_sync)
        }
    }
}

/// How mount(8) runs us: as `mount.fuse.snapmount SOURCE MOUNTPOINT -o OPTS`
/// (our own helper link), or through fuse3's mount.fuse as
/// `snapmount SOURCE MOUNTPOINT -o OPTS`. Returns the argument list rewritten
/// as `snapmount mount ...`, or `None` for an ordinary command line.
pub fn mount_helper_args(args: &[std::ffi::OsString]) -> Option<Vec<std::ffi::OsString>> {
    let argv0 = std::path::Path::new(args.first()?).file_name()?.to_string_lossy().into_owned();
    let as_helper = argv0.starts_with("mount.");
    let first = args.get(1)?.to_string_lossy().into_owned();
    const COMMANDS: [&str; 6] = ["mount", "umount", "unmount", "info", "export", "help"];
    if !as_helper && (first.starts_with('-') || COMMANDS.contains(&first.as_str())) {
        return None;
    }
    let mut out = vec!["snapmount".into(), "mount".into()];
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match a.to_str() {
            // mount(8)'s helper flags: -n (no mtab), -s (sloppy), -v (verbose), -f (fake).
            Some("-n") | Some("-s") => {}
            Some("-v") => out.push("-v".into()),
            Some("-o") => {
                out.push("-o".into());
                out.push(rest.next()?.clone());
            }
            _ => out.push(a.clone()),
        }
    }
    Some(out)
}
