//! The Debian package holds what it should, and the man page documents every
//! command and option the CLI has.

mod common;

use std::path::Path;

use common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_man_page_lists_every_command_and_option() {
    let man = std::fs::read_to_string(root().join("man/snapmount.1")).unwrap().replace("\\-", "-");
    for cmd in ["mount", "umount", "info", "export"] {
        assert!(man.contains(&format!("snapmount {cmd}")), "man page lacks `snapmount {cmd}`");
        let help = run(bin(), &[cmd, "--help"]);
        for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
            if let Some(opt) = word.strip_prefix("--") {
                let opt = opt.split('=').next().unwrap().trim_end_matches('.');
                if opt.is_empty() || opt == "help" {
                    continue;
                }
                assert!(man.contains(&format!("--{opt}")), "man page lacks --{opt} (from `snapmount {cmd} --help`)");
            }
        }
    }
    for opt in [
        "allow_other",
        "uid=",
        "gid=",
        "umask=",
        "cache_size=",
        "password_file=",
        "log_file=",
        "threads=",
        "force_share",
        "trust_backing",
    ] {
        assert!(man.contains(opt), "man page lacks the -o option {opt}");
    }
}

#[test]
fn the_debian_package_installs_binary_helper_man_page_and_units() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = run_in(Some(root()), "packaging/build-deb.sh", &[tmp.path().to_str().unwrap()]);
    let deb = deb.trim();
    let listing = run("dpkg-deb", &["-c", deb]);
    for path in [
        "./usr/bin/snapmount",
        "./sbin/mount.fuse.snapmount -> /usr/bin/snapmount",
        "./usr/share/man/man1/snapmount.1.gz",
        "./lib/systemd/system/snapmount@.service",
        "./usr/share/doc/snapmount/examples/mnt-vm.mount",
        "./usr/share/doc/snapmount/copyright",
    ] {
        assert!(listing.contains(path), "package lacks {path}:\n{listing}");
    }
    assert_eq!(run("dpkg-deb", &["-f", deb, "Package"]).trim(), "snapmount");
    let version = run("dpkg-deb", &["-f", deb, "Version"]);
    assert_eq!(version.trim(), env!("CARGO_PKG_VERSION"));
    // Unpacked, the binary runs and the man page renders.
    let unpacked = tmp.path().join("root");
    run("dpkg-deb", &["-x", deb, unpacked.to_str().unwrap()]);
    let v = run(unpacked.join("usr/bin/snapmount").to_str().unwrap(), &["--version"]);
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    let unit = std::fs::read_to_string(unpacked.join("lib/systemd/system/snapmount@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/snapmount mount --foreground"), "{unit}");
    let page = run("gzip", &["-dc", unpacked.join("usr/share/man/man1/snapmount.1.gz").to_str().unwrap()]);
    assert!(page.starts_with(".TH SNAPMOUNT 1"));
}
