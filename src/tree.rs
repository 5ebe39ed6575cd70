//! What a format hands the catalog: a small tree of names, each a view, a
//! few bytes (JSON), bytes made on first use, or a directory of more. The
//! catalog lays it out under the image's directory without knowing the
//! format.

use std::sync::Arc;

use crate::view::View;

pub enum Tree {
    Dir(Vec<(String, Tree)>),
    View(Arc<dyn View>),
    Bytes(Vec<u8>),
    Lazy(Box<dyn Fn() -> Vec<u8> + Send + Sync>),
}

impl Tree {
    /// A JSON file, written as every info.json is.
    pub fn json(v: &serde_json::Value) -> Tree {
        Tree::Bytes(json_text(v))
    }
}

/// Pretty JSON with a final newline, as bytes of a file.
pub fn json_text(v: &serde_json::Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(v).expect("JSON values serialize");
    text.push(b'\n');
    text
}

/// Builds a directory, with `~2`, `~3`, ... for names met again.
#[derive(Default)]
pub struct DirBuilder(Vec<(String, Tree)>);

impl DirBuilder {
    /// Adds `stem` + `ext` (a second one becomes `stem~2` + `ext`); returns
    /// the name used.
    pub fn add(&mut self, stem: &str, ext: &str, tree: Tree) -> String {
        let mut name = format!("{stem}{ext}");
        let mut n = 1;
        while self.0.iter().any(|(k, _)| *k == name) {
            n += 1;
            name = format!("{stem}~{n}{ext}");
        }
        self.0.push((name.clone(), tree));
        name
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn build(self) -> Tree {
        Tree::Dir(self.0)
    }
}
