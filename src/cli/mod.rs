//! The `snapmount` command line: argument parsing and the commands.

mod daemon;
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
    /// Unmount a snapmount mountpoint (also cleans a stale one).
    #[command(alias = "unmount")]
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
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
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_CACHE, value_parser = parse_size)]
    pub cache_size: u64,
    /// Let other users read the mount (needs user_allow_other in
    /// /etc/fuse.conf when not root).
    #[arg(long)]
    pub allow_other: bool,
    /// FUSE worker threads (default: 2 per CPU, at least 4).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Read the password of encrypted HEXZ archives from this file
    /// (else SNAPMOUNT_PASSWORD, else a prompt on the terminal).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Write the daemon's log to this file (in the background; default: no log).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// More detail in the log (-vv for even more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Runs the command; the error, if any, is one line for the user.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mount(args) => daemon::mount(args),
        Command::Umount { mountpoint } => umount::umount(&mountpoint),
    }
}
