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

use super::error::{ConfigError, ConfigErrors, Origin, Problems, plain_words};
use super::file::ExperimentFile;
use super::keys;

/// Prefix of environment overrides: `MINIMIND_<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "MINIMIND_";

/// minimind's own variables under the prefix that are not config keys (they choose how the
/// process runs, not what the run is): no warning, and sweep points inherit them.
pub const OWN_VARS: &[&str] = &[
    "MINIMIND_CUDA_EMULATOR",
    "MINIMIND_CUDA_EMULATOR_SHUFFLE",
    "MINIMIND_CUDA_LIBS",
    "MINIMIND_CUDA_SYNC",
    "MINIMIND_CUDA_FLASH",
    "MINIMIND_CACHE_DIR",
    "MINIMIND_CPU_ISA",
    crate::signals::DRIVER_FD_VAR,
];

/// Whether environment variable `name` is meant for the config: under the prefix and not one
/// of [`OWN_VARS`]. Pure.
pub fn is_config_var(name: &str) -> bool {
    name.starts_with(ENV_PREFIX) && !OWN_VARS.contains(&name)
}

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
pub fn layer(
    path: &Path,
    env: &[Assign],
    sets: &[Assign],
    point: &[Assign],
) -> Result<Layered, ConfigErrors> {
    let files = read_chain(path)?;
    let mut figment = Figment::from(Serialized::defaults(ExperimentFile::default()));
    for file in &files {
        figment = figment.merge(Toml::file_exact(&file.path));
    }
    let assigns: Vec<Assign> = env.iter().chain(sets).chain(point).cloned().collect();
    merge_assigns(figment, files, assigns, path)
}

/// The layers of a run folder's `config.toml` (what `resume` continues from): the resolved
/// config read back as a file of its own, checked key by key like an experiment file, with
/// `sets` on top. Its derived values (`[derived]`, `model.head_dim`) are recomputed, not read.
pub fn layer_run_config(path: &Path, sets: &[Assign]) -> Result<Layered, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            Origin::FileOnly(path.to_path_buf()),
            None,
            format!("cannot read the run's config: {e}"),
        )
    })?;
    let mut table = check_text(path, &text, Kind::RunConfig)?;
    // minimind writes every section of a run's config.toml; one missing means the file was
    // emptied or cut short, and defaults must not stand in for what the run trained with.
    let missing: Vec<&str> =
        ["model", "data", "train", "checkpoint"].into_iter().filter(|s| !table.contains_key(*s)).collect();
    if !missing.is_empty() {
        return Err(ConfigError::new(
            Origin::FileOnly(path.to_path_buf()),
            None,
            format!(
                "the run's config.toml has no [{}] section: it was emptied or cut short (minimind writes every section)",
                missing.join("], [")
            ),
        )
        .hint("restore it (from git or a backup); each checkpoint's state.json also records the config it was trained with")
        .into());
    }
    table.remove("derived");
    if let Some(toml::Value::Table(model)) = table.get_mut("model") {
        model.remove("head_dim");
    }
    let figment = Figment::from(Serialized::defaults(ExperimentFile::default()))
        .merge(FileTable { path: path.to_path_buf(), table });
    let files = vec![FileText { path: path.to_path_buf(), text }];
    merge_assigns(figment, files, sets.to_vec(), path)
}

fn merge_assigns(
    mut figment: Figment,
    files: Vec<FileText>,
    assigns: Vec<Assign>,
    path: &Path,
) -> Result<Layered, ConfigErrors> {
    let mut problems = Problems::default();
    for a in &assigns {
        problems.take(check_assign(a));
    }
    problems.finish()?;
    for a in &assigns {
        figment = figment.merge(a.clone());
    }
    let merged: ExperimentFile = figment.extract().map_err(|e| {
        // Every layer was checked alone, so this is a bug rather than bad input; still report it.
        ConfigError::new(Origin::FileOnly(path.to_path_buf()), None, e.to_string())
    })?;
    Ok(Layered { figment, merged, files, assigns })
}

/// A file's table as a figment layer whose values are located in that file.
struct FileTable {
    path: PathBuf,
    table: toml::Table,
}

impl Provider for FileTable {
    fn metadata(&self) -> Metadata {
        Metadata::from(self.path.display().to_string(), self.path.as_path())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let value = <Value as Deserialize>::deserialize(toml::Value::Table(self.table.clone()))
            .map_err(|e| figment::Error::from(e.to_string()))?;
        let dict = value.into_dict().ok_or_else(|| figment::Error::from("not a table".to_string()))?;
        Ok(Profile::Default.collect(dict))
    }
}

/// Reads the experiment file and every file it `extends`, checking each; base first.
fn read_chain(path: &Path) -> Result<Vec<FileText>, ConfigErrors> {
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
            )
            .into());
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

/// What kind of file is being checked: an experiment file, or a run folder's config.toml
/// (which also holds derived values, and no `extends` or sweep).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Experiment,
    RunConfig,
}

/// Checks one experiment file alone: TOML syntax, then every key and every value, reporting
/// every problem found.
fn check_file(path: &Path, text: &str) -> Result<ExperimentFile, ConfigErrors> {
    check_text(path, text, Kind::Experiment)?;
    toml::from_str::<ExperimentFile>(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let doc = ImDocument::parse(text).ok();
        let key = doc.and_then(|d| key_at_offset(d.as_table(), "", offset));
        ConfigError::new(Origin::file_at(path, text, offset), key.as_deref(), plain_words(e.message())).into()
    })
}

/// Syntax, then every key (unknown keys with a suggestion) and every value's type, each value
/// on its own so that all problems are reported together. Returns the file as a table.
fn check_text(path: &Path, text: &str, kind: Kind) -> Result<toml::Table, ConfigErrors> {
    let doc = ImDocument::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::new(
            Origin::file_at(path, text, offset),
            None,
            format!("malformed TOML: {}", e.message().trim()),
        )
    })?;
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::new(
            Origin::file_at(path, text, offset),
            None,
            format!("malformed TOML: {}", e.message()),
        )
    })?;
    let mut problems = Problems::default();
    check_keys(path, text, doc.as_table(), &table, &[], kind, &mut problems);
    problems.finish()?;
    Ok(table)
}

fn check_keys(
    path: &Path,
    text: &str,
    doc: &dyn TableLike,
    table: &toml::Table,
    parents: &[&str],
    kind: Kind,
    problems: &mut Problems,
) {
    for (k, item) in doc.iter() {
        let mut parts = parents.to_vec();
        parts.push(k);
        let key = parts.join(".");
        let key_span = doc.key(k).and_then(|k| k.span()).or_else(|| item.span());
        let origin = Origin::file_at(path, text, key_span.as_ref().map_or(0, |s| s.start));
        if kind == Kind::RunConfig {
            if key == "derived" || key == "model.head_dim" {
                continue;
            }
            if key == "extends" || key == "sweep" || key == "launcher" {
                let msg = "a run's config.toml is the resolved config: it has no `extends`, `[sweep]` or `[launcher]`";
                problems.push(ConfigError::new(origin, Some(&key), msg));
                continue;
            }
        }
        let Some(value) = table.get(k) else { continue };
        if keys::is_leaf(&key) {
            if let Err(msg) = check_value(&parts, value) {
                let at = item.span().or(key_span).map_or(0, |s| s.start);
                problems.push(ConfigError::new(Origin::file_at(path, text, at), Some(&key), msg));
            }
        } else if keys::is_section(&key) {
            match (item.as_table_like(), value) {
                (Some(inner), toml::Value::Table(inner_table)) => {
                    check_keys(path, text, inner, inner_table, &parts, kind, problems)
                }
                _ => problems.push(ConfigError::new(origin, Some(&key), "expected a table (a section)")),
            }
        } else {
            problems.push(unknown_key(origin, &key, |k| format!("`{k}`")));
        }
    }
}

/// Whether `value` suits the leaf at `parts` (checked alone, as the only value of a file);
/// the problem in plain words when it does not.
fn check_value(parts: &[&str], value: &toml::Value) -> Result<(), String> {
    let mut nested = value.clone();
    for part in parts.iter().rev() {
        nested = toml::Value::Table(toml::Table::from_iter([(part.to_string(), nested)]));
    }
    ExperimentFile::deserialize(nested).map(|_| ()).map_err(|e| plain_words(e.message()))
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

/// What the environment sets: its assignments, and warnings about `MINIMIND_*` variables that
/// name no section and are ignored.
#[derive(Debug, Default)]
pub struct EnvLayer {
    pub assigns: Vec<Assign>,
    pub warnings: Vec<String>,
}

/// Reads `MINIMIND_<SECTION>__<KEY>` variables out of an environment listing. A variable whose
/// first part is no section or top-level key is ignored with a warning (other tools may use the
/// prefix); one that looks like a section joined with a single underscore is an error.
pub fn parse_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<EnvLayer, ConfigErrors> {
    let mut out = EnvLayer::default();
    let mut problems = Problems::default();
    for (name, raw) in vars {
        if !is_config_var(&name) {
            continue;
        }
        let rest = &name[ENV_PREFIX.len()..];
        let origin = Origin::Env(name.clone());
        let key = rest.to_ascii_lowercase().split("__").collect::<Vec<_>>().join(".");
        let first = key.split('.').next().unwrap_or_default();
        if !keys::is_section(first) && !keys::is_leaf(first) {
            let section = keys::leaf_keys()
                .iter()
                .filter_map(|k| k.split_once('.').map(|(s, _)| s))
                .find(|s| first.starts_with(&format!("{s}_")));
            match section {
                Some(s) => {
                    let fixed = format!("{ENV_PREFIX}{}__{}", s.to_ascii_uppercase(), &rest[s.len() + 1..]);
                    problems.push(
                        ConfigError::new(origin, None, format!("`{first}` is not a section or key"))
                            .hint(format!("separate the section from the key with a double underscore: {fixed}")),
                    );
                }
                None => out.warnings.push(format!(
                    "ignoring environment variable {name}: `{first}` is not a config section (MINIMIND_<SECTION>__<KEY> sets a config key)"
                )),
            }
            continue;
        }
        match parse_value(raw.trim()) {
            Ok(value) => out.assigns.push(Assign { origin, key, value }),
            Err(e) => {
                problems.push(ConfigError::new(origin, Some(&key), format!("invalid value `{raw}`: {e}")))
            }
        }
    }
    problems.finish()?;
    out.assigns.sort_by_key(|a| a.origin.to_string());
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
    let parts: Vec<&str> = a.key.split('.').collect();
    check_value(&parts, &a.value).map_err(|msg| ConfigError::new(a.origin.clone(), Some(&a.key), msg))
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
