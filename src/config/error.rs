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
    /// A command-line argument other than `--set`, as given.
    Arg(String),
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
            Origin::Arg(arg) => write!(f, "{arg}"),
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
    pub(crate) fn render(&self) -> String {
        let key = self.key.as_ref().map_or(String::new(), |k| format!("`{k}`: "));
        let hint = self.hint.as_ref().map_or(String::new(), |h| format!("\n  hint: {h}"));
        format!("{}: {key}{}{hint}", self.origin, self.message)
    }
}

/// Every problem found in one go (all of a file's, all of a resolution's), shown one per
/// `error:` line so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.0.iter().map(ConfigError::render).collect::<Vec<_>>().join("\nerror: "))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Collects problems; `finish` turns them into `Err` when there were any.
#[derive(Default)]
pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    pub fn push(&mut self, e: ConfigError) {
        self.0.push(e);
    }
    pub fn extend(&mut self, e: ConfigErrors) {
        self.0.extend(e.0);
    }
    /// Records the error of `r`, if any, and passes its value on.
    pub fn take<T>(&mut self, r: Result<T, impl Into<ConfigErrors>>) -> Option<T> {
        r.map_err(|e| self.extend(e.into())).ok()
    }
    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(ConfigErrors(self.0)) }
    }
}

/// Serde's type errors in plain words: `invalid type: string "16", expected usize` becomes
/// `expected a non-negative integer, got the string "16"`. Other messages pass unchanged.
pub fn plain_words(message: &str) -> String {
    let expected = |e: &str| -> String {
        match e.trim() {
            "usize" | "u64" | "u32" | "u16" | "u8" => "a non-negative integer".into(),
            "isize" | "i64" | "i32" => "an integer".into(),
            "f64" | "f32" => "a number".into(),
            "a boolean" => "true or false".into(),
            "a string" => "a string (in quotes)".into(),
            "a sequence" => "a list".into(),
            "a map" => "a table".into(),
            other => match other.strip_prefix("an array of length ") {
                Some(n) => format!("a list of {n} values"),
                None => other.to_string(),
            },
        }
    };
    let got = |g: &str| -> String {
        let g = g.trim();
        let unquote = |s: &str| s.trim_matches('`').to_string();
        if let Some(s) = g.strip_prefix("string ") {
            format!("the string {s}")
        } else if let Some(n) = g.strip_prefix("integer ") {
            format!("the integer {}", unquote(n))
        } else if let Some(n) = g.strip_prefix("floating point ") {
            format!("the number {}", unquote(n))
        } else if let Some(b) = g.strip_prefix("boolean ") {
            format!("the boolean {}", unquote(b))
        } else if g == "sequence" {
            "a list".into()
        } else if g == "map" {
            "a table".into()
        } else {
            g.to_string()
        }
    };
    let m = message.trim();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = m.strip_prefix(prefix)
            && let Some((g, e)) = rest.rsplit_once(", expected ")
        {
            return format!("expected {}, got {}", expected(e), got(g));
        }
    }
    if let Some(rest) = m.strip_prefix("invalid length ")
        && let Some((n, e)) = rest.split_once(", expected ")
    {
        return format!("expected {}, got {n} value(s)", expected(e));
    }
    m.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words_table() {
        let table = [
            (
                "invalid type: string \"16\", expected usize",
                "expected a non-negative integer, got the string \"16\"",
            ),
            (
                "invalid value: integer `-1`, expected usize",
                "expected a non-negative integer, got the integer -1",
            ),
            ("invalid type: string \"x\", expected f64", "expected a number, got the string \"x\""),
            (
                "invalid length 1, expected an array of length 2",
                "expected a list of 2 values, got 1 value(s)",
            ),
            ("invalid type: integer `3`, expected a boolean", "expected true or false, got the integer 3"),
            (
                "invalid type: floating point `1.5`, expected usize",
                "expected a non-negative integer, got the number 1.5",
            ),
            (
                "unknown variant `fp8`, expected one of `float32`",
                "unknown variant `fp8`, expected one of `float32`",
            ),
        ];
        for (raw, want) in table {
            assert_eq!(plain_words(raw), want, "{raw}");
        }
    }

    #[test]
    fn line_col_table() {
        let text = "a = 1\nbé = 2\n";
        for (offset, want) in [(0, (1, 1)), (4, (1, 5)), (6, (2, 1)), (9, (2, 3)), (99, (3, 1))] {
            assert_eq!(line_col(text, offset), want, "offset {offset}");
        }
    }
}
