//! Config errors: what went wrong, the key, and where the offending value came from.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a value (or a piece of text) came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// A built-in default.
    Default,
    /// A position in an experiment file (1-based line and column).
    File { path: PathBuf, line: usize, col: usize },
    /// A whole file, position unknown.
    FileOnly(PathBuf),
    /// An environment variable, by name.
    Env(String),
    /// A `--set key=value` argument, as given.
    Set(String),
    /// A sweep point of a file.
    Sweep { path: PathBuf, tag: String },
    /// Computed from other values.
    Derived,
}

impl Origin {
    pub fn file_at(path: &Path, text: &str, offset: usize) -> Origin {
        let (line, col) = line_col(text, offset);
        Origin::File { path: path.to_path_buf(), line, col }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File { path, line, col } => write!(f, "{}:{line}:{col}", path.display()),
            Origin::FileOnly(path) => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Set(arg) => write!(f, "--set {arg}"),
            Origin::Sweep { path, tag } => write!(f, "sweep point {tag} of {}", path.display()),
            Origin::Derived => write!(f, "derived"),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A configuration problem. Displayed as `ORIGIN: KEY: MESSAGE`, then an optional hint line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub origin: Origin,
    pub key: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl ConfigError {
    pub fn new(origin: Origin, key: Option<&str>, message: impl Into<String>) -> Self {
        ConfigError { origin, key: key.map(str::to_string), message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl ConfigError {
    fn render(&self) -> String {
        let key = self.key.as_ref().map_or(String::new(), |k| format!("`{k}`: "));
        let hint = self.hint.as_ref().map_or(String::new(), |h| format!("\n  hint: {h}"));
        format!("{}: {key}{}{hint}", self.origin, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_table() {
        let text = "a = 1\nbé = 2\n";
        for (offset, want) in [(0, (1, 1)), (4, (1, 5)), (6, (2, 1)), (9, (2, 3)), (99, (3, 1))] {
            assert_eq!(line_col(text, offset), want, "offset {offset}");
        }
    }
}
