//! Reading results: `ls` (runs and sweeps under a folder, found with walkdir), `compare` (the
//! config keys that differ, then the metrics, best validation loss first) and `plot` (one
//! line per run, SVG or PNG, with plotters).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::metrics::{StepMetrics, say};
use crate::run_dir::{RunDir, Status};
use crate::sweep::{self, Sweep};

/// One run, summarised from its meta.json and metrics.csv.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunSummary {
    pub path: PathBuf,
    pub name: String,
    /// The sweep tag of a sweep's point.
    pub tag: Option<String>,
    pub status: Status,
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub started: String,
    /// Training seconds so far (across resumes).
    pub duration_s: Option<f64>,
}

/// A sweep and its points.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SweepSummary {
    pub path: PathBuf,
    pub name: String,
    pub started: String,
    pub points: Vec<RunSummary>,
}

/// What `ls` found.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Found {
    Run(RunSummary),
    Sweep(SweepSummary),
}

/// A run as its files say: a damaged meta.json gives a `damaged` row (the folder name, the
/// metrics that can be read) rather than none; a run meta.json calls running whose process is
/// gone shows as `died`.
pub fn summarise(dir: &Path) -> Result<RunSummary> {
    let run = RunDir::open(dir)?;
    let rows = crate::metrics::read(&run.metrics_path()).unwrap_or_default();
    let last = rows.last();
    let mut summary = RunSummary {
        path: dir.to_path_buf(),
        name: dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string()),
        tag: None,
        status: Status::Damaged,
        steps: last.map_or(0, |r| r.step),
        final_loss: last.map(|r| r.loss),
        best_val_loss: rows.iter().filter_map(|r| r.val_loss).reduce(f64::min),
        tokens_per_s: last.map(|r| r.tokens_per_s),
        started: String::new(),
        duration_s: last.map(|r| r.elapsed_s),
    };
    if let Ok(meta) = run.read_meta() {
        summary.status = run.observed_status(&meta);
        summary.name = meta.name.clone();
        summary.tag = meta.sweep_tag.clone();
        summary.steps = summary.steps.max(meta.last_step.unwrap_or(0));
        summary.best_val_loss = meta.best_val_loss.or(summary.best_val_loss);
        summary.started = meta.started_at.get(..19).unwrap_or(&meta.started_at).replace('T', " ");
    }
    Ok(summary)
}

/// Every run and sweep under `root` (a sweep's points listed with it, not on their own).
pub fn find(root: &Path) -> Result<Vec<Found>> {
    if !root.is_dir() {
        bail!("{} is not a folder", root.display());
    }
    let mut found = Vec::new();
    let mut walk = walkdir::WalkDir::new(root).max_depth(4).sort_by_file_name().into_iter();
    while let Some(entry) = walk.next() {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if !entry.file_type().is_dir()
            || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) && path != root
        {
            if entry.file_type().is_dir() {
                walk.skip_current_dir();
            }
            continue;
        }
        if sweep::is_sweep(path) {
            let s = Sweep::open(path)?;
            let points = s.file.points.iter().filter_map(|p| summarise(&s.point_dir(p)).ok()).collect();
            found.push(Found::Sweep(SweepSummary {
                path: path.to_path_buf(),
                name: s.file.name.clone(),
                started: s.file.created_at.get(..19).unwrap_or_default().replace('T', " "),
                points,
            }));
            walk.skip_current_dir();
        } else if path.join("config.toml").is_file() && path.join("meta.json").is_file() {
            if let Ok(r) = summarise(path) {
                found.push(Found::Run(r));
            }
            walk.skip_current_dir();
        }
    }
    Ok(found)
}

fn num(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

fn row(r: &RunSummary, indent: &str) -> String {
    let label = match &r.tag {
        Some(t) => format!("{indent}{t}"),
        None => r.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string()),
    };
    format!(
        "{label:<40} {:<10} {:>6} {:>9} {:>9} {:>9}  {:<19} {:>8}",
        r.status,
        r.steps,
        num(r.final_loss, 4),
        num(r.best_val_loss, 4),
        num(r.tokens_per_s, 0),
        r.started,
        r.duration_s.map_or("-".into(), crate::units::duration)
    )
}

/// `minimind ls`: a table (or JSON) of what is under `root`.
pub fn ls(root: &Path, json: bool) -> Result<()> {
    let found = find(root)?;
    if json {
        say(&serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    say(&format!(
        "{:<40} {:<10} {:>6} {:>9} {:>9} {:>9}  {:<19} {:>8}",
        "run", "status", "steps", "loss", "best val", "tok/s", "started", "duration"
    ));
    for f in &found {
        match f {
            Found::Run(r) => {
                say(&row(r, ""));
            }
            Found::Sweep(s) => {
                let done = s.points.iter().filter(|p| p.status == Status::Completed).count();
                let folder = s.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string());
                say(&format!("{folder}  (sweep {}: {done} of {} points completed)", s.name, s.points.len()));
                for p in &s.points {
                    say(&row(p, "  "));
                }
            }
        }
    }
    if found.is_empty() {
        say(&format!("no runs or sweeps under {}", root.display()));
    }
    Ok(())
}

/// The runs behind arguments that are run folders or sweep folders.
pub fn runs_of(args: &[PathBuf]) -> Result<Vec<RunSummary>> {
    let mut runs = Vec::new();
    for a in args {
        if sweep::is_sweep(a) {
            let s = Sweep::open(a)?;
            for p in &s.file.points {
                runs.push(
                    summarise(&s.point_dir(p))
                        .with_context(|| format!("point {} of {}", p.tag, a.display()))?,
                );
            }
        } else {
            runs.push(
                summarise(a)
                    .with_context(|| format!("{} is neither a run folder nor a sweep folder", a.display()))?,
            );
        }
    }
    if runs.is_empty() {
        bail!("no runs given");
    }
    Ok(runs)
}

fn label(r: &RunSummary) -> String {
    r.tag
        .clone()
        .unwrap_or_else(|| r.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string()))
}

/// A run's resolved config as dotted key -> value.
fn flat_config(dir: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(dir.join("config.toml"))
        .with_context(|| format!("reading {}/config.toml", dir.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}/config.toml", dir.display()))?;
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<(String, String)>) {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                other => out.push((key, other.to_string())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", &table, &mut out);
    Ok(out)
}

/// The keys whose values differ between runs, with each run's value. Pure.
pub fn differing(configs: &[Vec<(String, String)>]) -> Vec<(String, Vec<String>)> {
    let mut keys: Vec<String> = configs.iter().flatten().map(|(k, _)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !k.starts_with("checkpoint.save_dir"))
        .filter_map(|k| {
            let values: Vec<String> = configs
                .iter()
                .map(|c| c.iter().find(|(key, _)| *key == k).map_or("-".into(), |(_, v)| v.clone()))
                .collect();
            values.iter().any(|v| *v != values[0]).then_some((k, values))
        })
        .collect()
}

/// `minimind compare`: the config keys that differ, then the metrics, best val first.
pub fn compare(args: &[PathBuf]) -> Result<()> {
    let mut runs = runs_of(args)?;
    runs.sort_by(|a, b| {
        let key = |r: &RunSummary| {
            (r.best_val_loss.is_none(), r.best_val_loss.or(r.final_loss).unwrap_or(f64::INFINITY))
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    });
    let configs: Vec<_> = runs.iter().map(|r| flat_config(&r.path)).collect::<Result<_>>()?;
    let diff = differing(&configs);
    if diff.is_empty() {
        say("the configs do not differ");
    } else {
        let head: Vec<String> = diff.iter().map(|(k, _)| k.clone()).collect();
        say(&format!("{:<32} {}", "run", head.join("  ")));
        for (i, r) in runs.iter().enumerate() {
            let vals: Vec<String> = diff.iter().map(|(k, v)| format!("{:>w$}", v[i], w = k.len())).collect();
            say(&format!("{:<32} {}", label(r), vals.join("  ")));
        }
    }
    say("");
    say(&format!(
        "{:<32} {:<10} {:>6} {:>9} {:>9} {:>9}",
        "run", "status", "steps", "loss", "best val", "tok/s"
    ));
    for r in &runs {
        say(&format!(
            "{:<32} {:<10} {:>6} {:>9} {:>9} {:>9}",
            label(r),
            r.status,
            r.steps,
            num(r.final_loss, 4),
            num(r.best_val_loss, 4),
            num(r.tokens_per_s, 0)
        ));
    }
    Ok(())
}

/// What `plot` can draw on each axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Metric {
    Loss,
    ValLoss,
    Lr,
    GradNorm,
    TokensPerS,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum XAxis {
    Step,
    Tokens,
    Time,
}

impl Metric {
    fn of(self, r: &StepMetrics) -> Option<f64> {
        match self {
            Metric::Loss => Some(r.loss),
            Metric::ValLoss => r.val_loss,
            Metric::Lr => Some(r.lr),
            Metric::GradNorm => Some(r.grad_norm),
            Metric::TokensPerS => Some(r.tokens_per_s),
        }
        .filter(|v| v.is_finite())
    }
    fn column(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::ValLoss => "val_loss",
            Metric::Lr => "lr",
            Metric::GradNorm => "grad_norm",
            Metric::TokensPerS => "tokens_per_s",
        }
    }
    fn axis(self) -> &'static str {
        match self {
            Metric::Loss => "training loss (nats/token)",
            Metric::ValLoss => "validation loss (nats/token)",
            Metric::Lr => "learning rate",
            Metric::GradNorm => "gradient norm (before clipping)",
            Metric::TokensPerS => "throughput (tokens/s)",
        }
    }
}

impl XAxis {
    fn of(self, r: &StepMetrics) -> f64 {
        match self {
            XAxis::Step => r.step as f64,
            XAxis::Tokens => r.tokens as f64,
            XAxis::Time => r.elapsed_s,
        }
    }
    fn axis(self) -> &'static str {
        match self {
            XAxis::Step => "optimiser step",
            XAxis::Tokens => "tokens trained on",
            XAxis::Time => "training time (s)",
        }
    }
}

/// One run's line: its label and (x, y) points.
type Series = (String, Vec<(f64, f64)>);

/// Each run's (label, points) of `metric` over `x`, and the runs left out: those with no
/// metrics yet or without the metric, each saying which.
fn series(runs: &[RunSummary], metric: Metric, x: XAxis) -> (Vec<Series>, Vec<String>) {
    let mut out = Vec::new();
    let mut lacking = Vec::new();
    for r in runs {
        let rows = crate::metrics::read(&r.path.join("metrics.csv")).unwrap_or_default();
        let points: Vec<(f64, f64)> =
            rows.iter().filter_map(|row| metric.of(row).map(|y| (x.of(row), y))).collect();
        if rows.is_empty() {
            lacking.push(format!("{} (no metrics yet)", label(r)));
        } else if points.is_empty() {
            lacking.push(format!(
                "{} (no {} values{})",
                label(r),
                metric.column(),
                if metric == Metric::ValLoss { ": no validation data" } else { "" }
            ));
        } else {
            out.push((label(r), points));
        }
    }
    (out, lacking)
}

/// The DejaVu Sans font (its licence in assets/fonts/LICENSE), for PNG text.
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// `minimind plot`: one line per run into `out` (.svg or .png).
pub fn plot(args: &[PathBuf], out: &Path, metric: Metric, x: XAxis, log_y: bool) -> Result<()> {
    let runs = runs_of(args)?;
    let (data, lacking) = series(&runs, metric, x);
    if !lacking.is_empty() {
        bail!("cannot plot {} for: {}", metric.column(), lacking.join(", "));
    }
    draw_file(&data, out, metric, x, log_y)
}

/// `loss.svg` in a sweep folder at the end of a local sweep: the training loss of every point
/// that logged one (a point that failed before its first row is named and left out).
pub fn plot_sweep_loss(root: &Path) -> Result<()> {
    let runs = runs_of(&[root.to_path_buf()])?;
    let (data, lacking) = series(&runs, Metric::Loss, XAxis::Step);
    if !lacking.is_empty() {
        say(&format!("loss.svg leaves out: {}", lacking.join(", ")));
    }
    if data.is_empty() {
        return Ok(());
    }
    draw_file(&data, &root.join("loss.svg"), Metric::Loss, XAxis::Step, false)
}

fn draw_file(data: &[Series], out: &Path, metric: Metric, x: XAxis, log_y: bool) -> Result<()> {
    use plotters::prelude::*;
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let size = (1000, 620);
    let title = format!("{} by {}", metric.axis(), x.axis());
    // Text is measured (both formats) and drawn (PNG) with the bundled font.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the bundled font does not load"))?;
    match ext.as_str() {
        "svg" => draw(SVGBackend::new(out, size).into_drawing_area(), &title, data, metric, x, log_y),
        "png" => draw(BitMapBackend::new(out, size).into_drawing_area(), &title, data, metric, x, log_y),
        _ => bail!("{}: the plot is written as .svg or .png", out.display()),
    }
    .with_context(|| format!("drawing {}", out.display()))?;
    say(&format!("wrote {} ({} run(s))", out.display(), data.len()));
    Ok(())
}

/// Line colours, in order: each readable on white (contrast at least 3:1, tested), no yellow.
const PALETTE: [(u8, u8, u8); 10] = [
    (0x1f, 0x77, 0xb4), // blue
    (0xd9, 0x5f, 0x02), // dark orange
    (0x2c, 0xa0, 0x2c), // green
    (0xd6, 0x27, 0x28), // red
    (0x94, 0x67, 0xbd), // purple
    (0x8c, 0x56, 0x4b), // brown
    (0xc5, 0x1b, 0x7d), // magenta
    (0x00, 0x83, 0x8f), // teal
    (0x7f, 0x7f, 0x7f), // grey
    (0x6b, 0x6b, 0x00), // olive
];

/// How many x ticks to ask for: on the step axis no more than there are integers in the
/// range (plus its ends), so no step is labelled twice. Pure.
fn x_label_count(x: XAxis, span: f64) -> usize {
    match x {
        XAxis::Step => (span.round() as usize + 1).clamp(2, 10),
        XAxis::Tokens | XAxis::Time => 10,
    }
}

/// A step-axis tick's label: the step, or nothing where a tick falls between two steps. Pure.
fn integer_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 { format!("{v:.0}") } else { String::new() }
}

fn draw<DB: plotters::prelude::DrawingBackend>(
    area: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    data: &[Series],
    metric: Metric,
    x: XAxis,
    log_y: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    area.fill(&WHITE).map_err(|e| err(&e))?;
    let all = data.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) =
        (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(px, py) in all {
        (x0, x1, y0, y1) = (x0.min(px), x1.max(px), y0.min(py), y1.max(py));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    // A logarithmic y axis is drawn as a linear axis over log10(y), labelled with y: plotters'
    // own log scale puts no ticks on narrow ranges such as a loss from 8.2 to 9.0.
    let tf = |v: f64| if log_y { v.log10() } else { v };
    if log_y && y0 <= 0.0 {
        bail!("--log-y needs positive {} values", metric.column());
    }
    let (y0, y1) = (tf(y0), tf(y1));
    let pad = ((y1 - y0) * 0.05).max(1e-12);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let mut builder = ChartBuilder::on(&area);
    builder.caption(title, ("sans-serif", 22)).margin(16).x_label_area_size(48).y_label_area_size(80);
    let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| err(&e))?;
    let y_label = |v: &f64| {
        let y = if log_y { 10f64.powf(*v) } else { *v };
        if y != 0.0 && (y.abs() < 1e-2 || y.abs() >= 1e5) { format!("{y:.2e}") } else { format!("{y:.3}") }
    };
    let x_label = |v: &f64| match x {
        XAxis::Step => integer_tick(*v),
        XAxis::Tokens => crate::units::human(v.round()),
        XAxis::Time if x1 < 60.0 => format!("{v:.1}s"),
        XAxis::Time => crate::units::duration(*v),
    };
    chart
        .configure_mesh()
        .x_desc(x.axis())
        .y_desc(if log_y { format!("{} (log scale)", metric.axis()) } else { metric.axis().to_string() })
        .x_labels(x_label_count(x, x1 - x0))
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in data.iter().enumerate() {
        let (r, g, b) = PALETTE[i % PALETTE.len()];
        let color = RGBColor(r, g, b).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().map(|&(px, py)| (px, tf(py))), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(lx, ly)| Rectangle::new([(lx, ly - 4), (lx + 16, ly + 4)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    area.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ticks_label_each_step_once() {
        for (span, want) in [(0.0, 2), (1.0, 2), (7.0, 8), (9.0, 10), (200.0, 10)] {
            assert_eq!(x_label_count(XAxis::Step, span), want, "span {span}");
        }
        assert_eq!(x_label_count(XAxis::Tokens, 3.0), 10);
        let labels: Vec<String> = [4.0, 4.5, 5.0, 5.999_999_9, 6.25].map(integer_tick).to_vec();
        assert_eq!(labels, ["4", "", "5", "6", ""]);
    }

    #[test]
    fn every_line_colour_reads_on_white() {
        // WCAG relative luminance and contrast against white (1.0).
        let lin = |c: u8| {
            let c = c as f64 / 255.0;
            if c <= 0.04045 { c / 12.92 } else { ((c + 0.055) / 1.055).powf(2.4) }
        };
        for (r, g, b) in PALETTE {
            let l = 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
            let contrast = 1.05 / (l + 0.05);
            assert!(contrast >= 3.0, "#{r:02x}{g:02x}{b:02x}: contrast {contrast:.2}");
            // No yellow: red and green both high with little blue.
            assert!(!(r > 0xb0 && g > 0xb0 && b < 0x80), "#{r:02x}{g:02x}{b:02x} is yellow");
        }
    }

    #[test]
    fn differing_keys_table() {
        let a = vec![
            ("train.learning_rate".into(), "0.001".into()),
            ("seed".into(), "42".into()),
            ("checkpoint.save_dir".into(), "\"a\"".into()),
        ];
        let b = vec![
            ("train.learning_rate".into(), "0.003".into()),
            ("seed".into(), "42".into()),
            ("checkpoint.save_dir".into(), "\"b\"".into()),
        ];
        let c = vec![("seed".into(), "42".into())];
        assert_eq!(
            differing(&[a.clone(), b]),
            vec![("train.learning_rate".to_string(), vec!["0.001".to_string(), "0.003".to_string()])]
        );
        assert_eq!(differing(&[a.clone(), a.clone()]), vec![]);
        assert_eq!(differing(&[a, c])[0].1, vec!["0.001".to_string(), "-".to_string()]);
    }
}
