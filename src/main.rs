use clap::Parser;
use tracing_subscriber::EnvFilter;

mod cli;

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = match cli::mount_helper_args(&argv) {
        Some(rewritten) => cli::Cli::parse_from(rewritten),
        None => cli::Cli::parse(),
    };
    let default_level = match &args.command {
        cli::Command::Mount(m) if m.verbose >= 2 => "trace",
        cli::Command::Mount(m) if m.verbose == 1 => "debug",
        _ => "info",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{default_level},fuser=warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = cli::run(args) {
        eprintln!("snapmount: {e:#}");
        std::process::exit(1);
    }
}
