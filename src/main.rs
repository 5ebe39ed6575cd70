use clap::Parser;

mod cli;

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = match cli::mount_helper_args(&argv) {
        Some(rewritten) => cli::Cli::parse_from(rewritten),
        None => cli::Cli::parse(),
    };
    let verbose = match &args.command {
        cli::Command::Mount(m) => m.verbose,
        _ => 0,
    };
    cli::log::init(verbose);
    if let Err(e) = cli::run(args) {
        eprintln!("snapmount: {e:#}");
        std::process::exit(1);
    }
}
