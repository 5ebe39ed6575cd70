//! Where log lines go: stderr in the foreground (and for the commands),
//! syslog/journald for a background daemon, or its `--log-file` (which is
//! then its stderr).

use std::ffi::CString;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

static TO_SYSLOG: AtomicBool = AtomicBool::new(false);

/// Sets up logging to stderr; `RUST_LOG` overrides the level.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // fuser::session warns "Failed to umount filesystem: EINVAL" whenever
    // the session ends after `umount` (it tries again on drop): its only
    // warning, and never one to act on. AWS's credential chain logs every
    // source it tried and did not find (a missing config file, no instance
    // metadata) as a warning; what matters reaches the user as our own
    // error naming the URL. So does a certificate that does not verify,
    // which rustls and its verifier would log once per try.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},fuser=warn,fuser::session=error,aws_config=error,aws_runtime=error,aws_smithy_runtime=error,\
             aws_smithy_http_client=error,aws_credential_types=error,rustls_platform_verifier=off,rustls=off"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .init();
}

/// From now on, log lines go to syslog (the daemon has detached).
pub fn to_syslog() {
    // SAFETY: the identity is a static C string, kept for the process's life.
    unsafe { libc::openlog(c"snapmount".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    TO_SYSLOG.store(true, Ordering::SeqCst);
}

struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { syslog: TO_SYSLOG.load(Ordering::Relaxed), buf: Vec::new() }
    }
}

/// One formatted event, written out when dropped.
pub struct Line {
    syslog: bool,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.syslog {
            let _ = io::stderr().write_all(&self.buf);
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        let head: String = text.chars().take(48).collect();
        let priority = if head.contains("ERROR") {
            libc::LOG_ERR
        } else if head.contains("WARN") {
            libc::LOG_WARNING
        } else if head.contains("DEBUG") || head.contains("TRACE") {
            libc::LOG_DEBUG
        } else {
            libc::LOG_INFO
        };
        if let Ok(msg) = CString::new(text.trim_end().replace('\0', "")) {
            // SAFETY: "%s" with one valid C string argument.
            unsafe { libc::syslog(priority, c"%s".as_ptr(), msg.as_ptr()) };
        }
    }
}
