//! Layering: defaults < `extends` chain < the file < `MINIMIND_*` environment < `--set` <
//! sweep point. [`layer`] is the one function that owns this order.
//!
//! Each layer is checked on its own before merging (syntax, unknown keys, types), so an error
//! points at the exact file:line:column, environment variable or `--set` argument.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;
use toml_edit::{ImDocument, Item, TableLike};

use super::error::{ConfigError, Origin};
use super::file::ExperimentFile;
use super::keys;

/// Prefix of environment overrides: `MINIMIND_<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "MINIMIND_";

/// One file of an `extends` chain: where it is and what it says.
#[derive(Clone, Debug)]
pub struct FileText {
    pub path: PathBuf,
    pub text: String,
}

/// One value set from outside the files: an environment variable, a `--set`, a sweep point.
#[derive(Clone, Debug, PartialEq)]
pub struct Assign {
    pub origin: Origin,
    pub key: String,
    pub value: toml::Value,
}

/// All layers of one experiment, merged.
#[derive(Debug)]
pub struct Layered {
    pub figment: Figment,
    pub merged: ExperimentFile,
    /// The `extends` chain, base first; the last is the experiment file itself.
    pub files: Vec<FileText>,
    /// Environment, `--set` and sweep-point values, lowest first.
    pub assigns: Vec<Assign>,
}

impl Layered {
    /// The experiment file itself (the end of the chain).
    pub fn path(&self) -> &Path {
        &self.files.last().expect("chain is never empty").path
    }

    /// Where the value of a dotted key came from.
    pub fn origin_of(&self, key: &str) -> Origin {
        self.origin_at(key, &key.split('.').collect::<Vec<_>>())
    }

    /// Where the value of `key` came from; when that is a file, the position of `parts` in it
    /// (a path of names at or under `key`, which may themselves contain dots).
    pub fn origin_at(&self, key: &str, parts: &[&str]) -> Origin {
        let Some(meta) = self.figment.find_metadata(key) else {
            return Origin::Derived;
        };
        if let Some(figment::Source::File(path)) = &meta.source {
            if let Some(file) = self.files.iter().find(|f| same_file(&f.path, path)) {
                return locate_parts(&file.path, &file.text, parts)
                    .unwrap_or_else(|| Origin::FileOnly(file.path.clone()));
            }
            return Origin::FileOnly(path.clone());
        }
        self.assigns
            .iter()
            .rev()
            .find(|a| a.origin.to_string() == meta.name)
            .map_or(Origin::Default, |a| a.origin.clone())
    }

    /// The folder of the file a key's value came from; relative paths are resolved against it
    /// (the current directory for defaults, environment and `--set`).
    pub fn base_dir_of(&self, key: &str) -> PathBuf {
        match self.figment.find_metadata(key).and_then(|m| m.source.as_ref()) {
            Some(figment::Source::File(path)) => path.parent().map(Path::to_path_buf).unwrap_or_default(),
            _ => PathBuf::from("."),
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Merges the layers in the one order the project defines. `point` is a sweep point's
/// values (empty outside sweeps).
pub fn layer(path: &Path, env: &[Assign], sets: &[Assign], point: &[Assign]) -> Result<Layered, ConfigError> {
    let files = read_chain(path)?;
    let mut figment = Figment::from(Serialized::defaults(ExperimentFile::default()));
    for file in &files {
        figment = figment.merge(Toml::file_exact(&file.path));
    }
    let assigns: Vec<Assign> = env.iter().chain(sets).chain(point).cloned().collect();
    for a in &assigns {
        check_assign(a)?;
        figment = figment.merge(a.clone());
    }
    let merged: ExperimentFile = figment.extract().map_err(|e| {
        // Every layer was checked alone, so this is a bug rather than bad input; still report it.
        ConfigError::new(Origin::FileOnly(path.to_path_buf()), None, e.to_string())
    })?;
    Ok(Layered { figment, merged, files, assigns })
}

/// Reads the experiment file and every file it `extends`, checking each; base first.
fn read_chain(path: &Path) -> Result<Vec<FileText>, ConfigError> {
    let mut chain: Vec<FileText> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut current = path.to_path_buf();
    let mut pointed_from: Option<Origin> = None;
    loop {
        let read = current.canonicalize().and_then(|c| Ok((std::fs::read_to_string(&c)?, c)));
        let (text, canonical) = read.map_err(|e| {
            let what = format!("cannot read experiment file {}: {e}", current.display());
            match &pointed_from {
                Some(origin) => ConfigError::new(origin.clone(), Some("extends"), what),
                None => ConfigError::new(Origin::FileOnly(current.clone()), None, what),
            }
        })?;
        if let Some(i) = seen.iter().position(|p| *p == canonical) {
            let mut cycle: Vec<String> = chain[i..].iter().map(|f| f.path.display().to_string()).collect();
            cycle.push(current.display().to_string());
            return Err(ConfigError::new(
                pointed_from.expect("a repeat is always reached through extends"),
                Some("extends"),
                format!("`extends` cycle: {}", cycle.join(" -> ")),
            ));
        }
        let file = check_file(&current, &text)?;
        seen.push(canonical);
        let extends = file.extends.clone();
        chain.push(FileText { path: current.clone(), text });
        match extends {
            Some(next) => {
                let this = chain.last().expect("just pushed");
                pointed_from = locate_key(&this.path, &this.text, "extends");
                let dir = current.parent().map(Path::to_path_buf).unwrap_or_default();
                current = dir.join(next);
            }
            None => break,
        }
    }
    chain.reverse();
    Ok(chain)
}

/// Checks one file alone: TOML syntax, unknown keys, value types.
fn check_file(path: &Path, text: &str) -> Result<ExperimentFile, ConfigError> {
    let doc = ImDocument::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::new(
            Origin::file_at(path, text, offset),
            None,
            format!("malformed TOML: {}", e.message().trim()),
        )
    })?;
    check_keys(path, text, doc.as_table(), "")?;
    toml::from_str::<ExperimentFile>(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let key = key_at_offset(doc.as_table(), "", offset);
        ConfigError::new(Origin::file_at(path, text, offset), key.as_deref(), e.message().trim())
    })
}

fn check_keys(path: &Path, text: &str, table: &dyn TableLike, prefix: &str) -> Result<(), ConfigError> {
    for (k, item) in table.iter() {
        let key = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        let span = table.key(k).and_then(|k| k.span()).or_else(|| item.span());
        let origin = Origin::file_at(path, text, span.map_or(0, |s| s.start));
        if keys::is_leaf(&key) {
            continue;
        }
        if keys::is_section(&key) {
            match item.as_table_like() {
                Some(inner) => check_keys(path, text, inner, &key)?,
                None => {
                    return Err(ConfigError::new(origin, Some(&key), "expected a table (a section)"));
                }
            }
            continue;
        }
        return Err(unknown_key(origin, &key, |k| format!("`{k}`")));
    }
    Ok(())
}

fn unknown_key(origin: Origin, key: &str, spell: impl Fn(&str) -> String) -> ConfigError {
    let err = ConfigError::new(origin, Some(key), "unknown key");
    match keys::suggest(key) {
        Some(s) => err.hint(format!("did you mean {}?", spell(&s))),
        None => err.hint("`minimind schema` lists every key"),
    }
}

/// The dotted key whose value spans `offset`, deepest first.
fn key_at_offset(table: &dyn TableLike, prefix: &str, offset: usize) -> Option<String> {
    for (k, item) in table.iter() {
        let key = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        if let Some(inner) = item.as_table_like()
            && let Some(found) = key_at_offset(inner, &key, offset)
        {
            return Some(found);
        }
        let spans = [item.span(), table.key(k).and_then(|k| k.span())];
        if spans.iter().flatten().any(|s| s.contains(&offset)) {
            return Some(key);
        }
    }
    None
}

/// Where a dotted key is written in a file, if it is.
fn locate_key(path: &Path, text: &str, key: &str) -> Option<Origin> {
    locate_parts(path, text, &key.split('.').collect::<Vec<_>>())
}

/// Where a key, given as its path of names (which may contain dots), is written in a file.
pub fn locate_parts(path: &Path, text: &str, parts: &[&str]) -> Option<Origin> {
    let doc = ImDocument::parse(text).ok()?;
    let mut table: &dyn TableLike = doc.as_table();
    for (i, part) in parts.iter().enumerate() {
        let (k, item) = table.get_key_value(part)?;
        if i + 1 == parts.len() {
            let start = k.span().or_else(|| item.span())?.start;
            return Some(Origin::file_at(path, text, start));
        }
        table = match item {
            Item::Table(t) => t,
            Item::Value(v) => v.as_inline_table()?,
            _ => return None,
        };
    }
    None
}

/// Parses `section.key=value`; the value in TOML syntax, a bare word taken as a string.
pub fn parse_set(arg: &str) -> Result<Assign, ConfigError> {
    let origin = Origin::Set(arg.to_string());
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(ConfigError::new(origin, None, "expected `section.key=value`")
            .hint("for example --set train.learning_rate=1e-3"));
    };
    let key = key.trim();
    let value = parse_value(raw.trim()).map_err(|e| {
        ConfigError::new(origin.clone(), Some(key), format!("invalid value `{raw}`: {e}"))
            .hint("values use TOML syntax: 3, 1e-3, true, \"text\", [0.9, 0.95]")
    })?;
    Ok(Assign { origin, key: key.to_string(), value })
}

/// Reads `MINIMIND_<SECTION>__<KEY>` variables out of an environment listing.
pub fn parse_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Vec<Assign>, ConfigError> {
    let mut out = Vec::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let origin = Origin::Env(name.clone());
        let key = rest.to_ascii_lowercase().split("__").collect::<Vec<_>>().join(".");
        let value = parse_value(raw.trim()).map_err(|e| {
            ConfigError::new(origin.clone(), Some(&key), format!("invalid value `{raw}`: {e}"))
        })?;
        out.push(Assign { origin, key, value });
    }
    out.sort_by_key(|a| a.origin.to_string());
    Ok(out)
}

/// The environment variable that sets a dotted key.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "__"))
}

fn parse_value(raw: &str) -> Result<toml::Value, String> {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => Ok(t.remove("v").expect("parsed key")),
        Err(e) => {
            let bare = !raw.is_empty() && raw.chars().all(|c| c.is_alphanumeric() || "-_./:+".contains(c));
            if bare { Ok(toml::Value::String(raw.to_string())) } else { Err(e.message().trim().to_string()) }
        }
    }
}

/// Checks one assignment alone: a known key and a value of the right type.
fn check_assign(a: &Assign) -> Result<(), ConfigError> {
    if !keys::is_leaf(&a.key) || a.key == "extends" {
        let spell = |k: &str| match &a.origin {
            Origin::Env(_) => format!("`{k}` ({})", env_name(k)),
            _ => format!("`{k}`"),
        };
        return Err(unknown_key(a.origin.clone(), &a.key, spell));
    }
    Figment::from(a.clone())
        .extract::<ExperimentFile>()
        .map(|_| ())
        .map_err(|e| ConfigError::new(a.origin.clone(), Some(&a.key), e.kind.to_string()))
}

impl Provider for Assign {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.origin.to_string())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let value = <Value as Deserialize>::deserialize(self.value.clone())
            .map_err(|e| figment::Error::from(e.to_string()))?;
        let dict = figment::util::nest(&self.key, value)
            .into_dict()
            .ok_or_else(|| figment::Error::from(format!("`{}` is not a key", self.key)))?;
        Ok(Profile::Default.collect(dict))
    }
}

/// Every dotted leaf key set by some file or assignment (for meta.json's override list).
pub fn keys_set_outside_defaults(layered: &Layered) -> BTreeSet<String> {
    keys::leaf_keys()
        .iter()
        .filter(|k| !matches!(layered.origin_of(k), Origin::Default | Origin::Derived))
        .cloned()
        .collect()
}
