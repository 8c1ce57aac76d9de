//! TensorBoard event files: every metrics row also goes to `events.out.tfevents.*` in the run
//! folder, so `tensorboard --logdir runs/` shows every run and sweep point.
//!
//! The file is TensorFlow's record format: per record a little-endian u64 length, the masked
//! CRC-32C of those 8 bytes, the data (one serialized `Event` protocol buffer) and its masked
//! CRC-32C. An `Event` here is `wall_time` (field 1, double), `step` (2, int64) and either
//! `file_version` (3, the first record) or a `Summary` (5) of scalar values (`tag` 1,
//! `simple_value` 2) or one text value (a string tensor, field 8, with the text plugin's
//! metadata, field 9). No protobuf library: these few fields are written by hand.
//!
//! Appends are crash-safe as metrics.csv's are: on resume the file is rewritten with only its
//! intact records up to the checkpoint's step (a torn last record, what a crash mid-append
//! leaves, is dropped with a note), so no step is listed twice.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::StepMetrics;

/// The prefix TensorBoard looks for.
const PREFIX: &str = "events.out.tfevents.";

/// CRC-32C (Castagnoli), bit-reflected, table-driven.
fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

/// The record format's masked CRC: rotated and offset so a CRC of CRCs is not trivial.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// One record around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The intact records at the start of `bytes` (their data), and whether anything followed
/// them (a torn or damaged tail).
fn records(bytes: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 12) else { return (out, true) };
        let len_bytes = &head[..8];
        let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return (out, true);
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let Some(data) = bytes.get(at + 12..at + 12 + len) else { return (out, true) };
        let Some(tail) = bytes.get(at + 12 + len..at + 16 + len) else { return (out, true) };
        if u32::from_le_bytes(tail.try_into().expect("4 bytes")) != masked_crc(data) {
            return (out, true);
        }
        out.push(data);
        at += 16 + len;
    }
    (out, false)
}

/// Protocol-buffer encoding of the few fields used.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7F) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, ((field as u64) << 3) | wire as u64);
    }

    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn int(out: &mut Vec<u8>, field: u32, v: i64) {
        key(out, field, 0);
        varint(out, v as u64);
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }

    /// The value of varint field `field` at the top level of `msg`, skipping the others.
    pub fn find_int(msg: &[u8], field: u32) -> Option<i64> {
        let mut at = 0;
        while at < msg.len() {
            let (k, n) = read_varint(&msg[at..])?;
            at += n;
            let (f, wire) = ((k >> 3) as u32, (k & 7) as u8);
            match wire {
                0 => {
                    let (v, n) = read_varint(&msg[at..])?;
                    if f == field {
                        return Some(v as i64);
                    }
                    at += n;
                }
                1 => at += 8,
                5 => at += 4,
                2 => {
                    let (len, n) = read_varint(&msg[at..])?;
                    at += n + len as usize;
                }
                _ => return None,
            }
        }
        None
    }

    fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
        let mut v = 0u64;
        for (i, &byte) in b.iter().enumerate().take(10) {
            v |= ((byte & 0x7F) as u64) << (7 * i);
            if byte & 0x80 == 0 {
                return Some((v, i + 1));
            }
        }
        None
    }
}

/// An `Event` with `wall_time`, `step` and a `summary` (or the file-version header).
fn event(wall_time: f64, step: i64, summary: Option<&[u8]>) -> Vec<u8> {
    let mut e = Vec::new();
    pb::double(&mut e, 1, wall_time);
    pb::int(&mut e, 2, step);
    match summary {
        Some(s) => pb::bytes(&mut e, 5, s),
        None => pb::bytes(&mut e, 3, b"brain.Event:2"),
    }
    e
}

/// A `Summary` of scalar values.
fn scalars(values: &[(&str, f64)]) -> Vec<u8> {
    let mut s = Vec::new();
    for (tag, v) in values {
        let mut value = Vec::new();
        pb::bytes(&mut value, 1, tag.as_bytes());
        pb::float(&mut value, 2, *v as f32);
        pb::bytes(&mut s, 1, &value);
    }
    s
}

/// A `Summary` with one text value: a scalar string tensor under the text plugin.
fn text(tag: &str, body: &str) -> Vec<u8> {
    let mut tensor = Vec::new();
    pb::int(&mut tensor, 1, 7); // dtype: DT_STRING
    pb::bytes(&mut tensor, 2, &[]); // tensor_shape: a scalar
    pb::bytes(&mut tensor, 8, body.as_bytes()); // string_val
    let mut plugin = Vec::new();
    pb::bytes(&mut plugin, 1, b"text"); // plugin_name
    let mut metadata = Vec::new();
    pb::bytes(&mut metadata, 1, &plugin); // plugin_data
    let mut value = Vec::new();
    pb::bytes(&mut value, 1, tag.as_bytes());
    pb::bytes(&mut value, 8, &tensor);
    pb::bytes(&mut value, 9, &metadata);
    let mut s = Vec::new();
    pb::bytes(&mut s, 1, &value);
    s
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The run's event file: the one already in `dir`, else a new name.
fn event_file(dir: &Path) -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(PREFIX)))
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| dir.join(format!("{PREFIX}{}.minimind", now() as u64)))
}

/// Appends events to the run's event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Opens the event file in `dir`; with `resume_step`, first keeps only its intact records
    /// up to that step. A new file starts with the header and `config` (the resolved config,
    /// shown as text at step 0). Returns notes about what was dropped.
    pub fn open(dir: &Path, resume_step: Option<usize>, config: &str) -> Result<(EventWriter, Vec<String>)> {
        let path = event_file(dir);
        let mut notes = Vec::new();
        if let Some(step) = resume_step
            && path.exists()
        {
            let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (kept, dropped) = keep_until(&bytes, step as i64);
            if let Some(note) = dropped {
                notes.push(format!("{}: {note}", path.display()));
            }
            crate::files::write_atomic(&path, &kept)?;
        }
        let new = !path.exists() || fs::metadata(&path).is_ok_and(|m| m.len() == 0);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            file.write_all(&record(&event(now(), 0, None)))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let mut w = EventWriter { file, path };
        if new {
            w.append(0, &text("config", &format!("```toml\n{config}```")))?;
        }
        Ok((w, notes))
    }

    fn append(&mut self, step: usize, summary: &[u8]) -> Result<()> {
        let bytes = record(&event(now(), step as i64, Some(summary)));
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.flush())
            .with_context(|| format!("appending to {}", self.path.display()))
    }

    /// The scalars of one metrics row (val_loss where it was measured).
    pub fn write(&mut self, row: &StepMetrics) -> Result<()> {
        let mut values = vec![
            ("loss", row.loss),
            ("lm_loss", row.lm_loss),
            ("aux_loss", row.aux_loss),
            ("lr", row.lr),
            ("grad_norm", row.grad_norm),
            ("tokens_per_s", row.tokens_per_s),
        ];
        if let Some(v) = row.val_loss {
            values.push(("val_loss", v));
        }
        self.append(row.step, &scalars(&values))
    }
}

/// The records of an event file to keep when resuming from `step`: the intact ones up to it
/// (the file-version header always), and what was dropped, if anything. Pure.
fn keep_until(bytes: &[u8], step: i64) -> (Vec<u8>, Option<String>) {
    let (recs, torn) = records(bytes);
    let mut kept = Vec::new();
    let mut later = 0;
    for (i, data) in recs.iter().enumerate() {
        if i == 0 || pb::find_int(data, 2).unwrap_or(0) <= step {
            kept.extend_from_slice(&record(data));
        } else {
            later += 1;
        }
    }
    let mut why = Vec::new();
    if torn {
        why.push("dropped a torn last record (the process died while writing it)".to_string());
    }
    if later > 0 {
        why.push(format!("{later} record(s) after step {step} dropped; those steps run again"));
    }
    (kept, (!why.is_empty()).then(|| why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_known_inputs() {
        // RFC 3720's CRC-32C check values.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let events: Vec<Vec<u8>> =
            (0..4).map(|s| event(1.0, s, if s == 0 { None } else { Some(&b"x"[..]) })).collect();
        let file: Vec<u8> = events.iter().flat_map(|e| record(e)).collect();
        let (recs, torn) = records(&file);
        assert!(!torn);
        assert_eq!(recs, events.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for cut in 1..20 {
            let (recs, torn) = records(&file[..file.len() - cut]);
            assert!(torn && recs.len() == 3, "cut {cut}");
        }
        // Resuming from step 2 keeps the header and steps 1 and 2.
        let (kept, note) = keep_until(&file[..file.len() - 5], 2);
        assert_eq!(records(&kept).0.len(), 3);
        assert!(note.unwrap().contains("torn"));
        let (kept, note) = keep_until(&file, 3);
        assert_eq!((kept, note), (file.clone(), None));
    }

    #[test]
    fn the_step_is_read_back_from_an_event() {
        for step in [0, 1, 127, 128, 300_000] {
            assert_eq!(pb::find_int(&event(1.5, step, Some(&scalars(&[("loss", 2.0)]))), 2), Some(step));
        }
    }
}
