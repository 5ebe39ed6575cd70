//! Passwords of encrypted archives: `--password-file`, `SNAPMOUNT_PASSWORD`,
//! or a prompt on the terminal (before the daemon detaches).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub const ENV: &str = "SNAPMOUNT_PASSWORD";

/// Answers the password request for `archive`.
pub fn password_for(file: Option<&PathBuf>, archive: &Path) -> Result<String, String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("password file {}: {e}", f.display()))?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_string());
    }
    if let Ok(p) = std::env::var(ENV) {
        return Ok(p);
    }
    prompt(archive).map_err(|e| format!("a password is needed: give --password-file FILE or set {ENV} ({e})"))
}

fn prompt(archive: &Path) -> std::io::Result<String> {
    let mut tty = File::options().read(true).write(true).open("/dev/tty")?;
    write!(tty, "Password for {}: ", archive.display())?;
    tty.flush()?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios on our own open terminal descriptor.
    let saved = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        libc::tcsetattr(fd, libc::TCSANOW, &t);
        saved
    };
    let mut line = String::new();
    let read = BufReader::new(tty.try_clone()?).read_line(&mut line);
    // SAFETY: restores what tcgetattr returned.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    let _ = writeln!(tty);
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}
