//! Passwords of encrypted images and archives: `--password-file
//! [IMAGE=]FILE` (repeatable), `SNAPMOUNT_PASSWORD`, or a prompt on the
//! terminal (before the daemon detaches).

use std::path::{Path, PathBuf};

pub const ENV: &str = "SNAPMOUNT_PASSWORD";

/// The `--password-file` arguments: a file for one image (`IMAGE=FILE`,
/// IMAGE its file name or path) or for every image (`FILE`).
#[derive(Clone, Debug, Default)]
pub struct PasswordFiles(Vec<(Option<String>, PathBuf)>);

impl PasswordFiles {
    /// `IMAGE=FILE`, or `FILE` when there is no `=` or the whole argument
    /// names an existing file.
    pub fn add(&mut self, arg: &str) {
        match arg.split_once('=') {
            Some((image, file)) if !Path::new(arg).exists() => self.0.push((Some(image.to_string()), file.into())),
            _ => self.0.push((None, arg.into())),
        }
    }

    pub fn from_args(args: &[String]) -> PasswordFiles {
        let mut files = PasswordFiles::default();
        args.iter().for_each(|a| files.add(a));
        files
    }

    /// The file for `image`: one given for it by name or path first, else
    /// one given for every image.
    fn file_for(&self, image: &Path) -> Option<&Path> {
        let names = |named: &str| {
            let named = Path::new(named);
            image.file_name() == Some(named.as_os_str())
                || image == named
                || std::fs::canonicalize(named).ok().zip(std::fs::canonicalize(image).ok()).is_some_and(|(a, b)| a == b)
        };
        let specific = self.0.iter().find(|(n, _)| n.as_deref().is_some_and(names));
        specific.or_else(|| self.0.iter().find(|(n, _)| n.is_none())).map(|(_, f)| f.as_path())
    }

    /// The password of `image` (a qcow2 image or HEXZ archive). A file's
    /// trailing newline is not part of the password.
    pub fn password_for(&self, image: &Path) -> Result<String, String> {
        if let Some(f) = self.file_for(image) {
            let text = std::fs::read_to_string(f).map_err(|e| format!("password file {}: {e}", f.display()))?;
            return Ok(text.trim_end_matches(['\n', '\r']).to_string());
        }
        if let Ok(p) = std::env::var(ENV) {
            return Ok(p);
        }
        prompt(image).map_err(|e| {
            format!("a password is needed: give --password-file [IMAGE=]FILE or set {ENV} (no terminal to ask: {e})")
        })
    }
}

/// Asks on the terminal (not stdin: that may be a pipe), without echo.
fn prompt(image: &Path) -> std::io::Result<String> {
    rpassword::prompt_password(format!("Password for {}: ", image.display()))
}
