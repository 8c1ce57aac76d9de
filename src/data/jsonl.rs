//! Reading JSON-lines data, one `{"text": ...}` per line. The token cache and evaluation both
//! read through here (via `source`), so they accept and reject exactly the same lines.

use std::io::BufRead;

/// How many skipped line numbers are kept for messages and meta.json.
pub const FIRST_SKIPPED: usize = 5;

/// The lines of a jsonl stream that are not blank: `(1-based line number, the line or why it
/// cannot be used)`. A line that is not UTF-8 is an unusable line, not an I/O error.
pub struct Lines<R> {
    reader: R,
    number: u64,
    bytes: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    pub fn new(reader: R) -> Self {
        Lines { reader, number: 0, bytes: 0, buf: Vec::new() }
    }

    /// Bytes consumed so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Lines read so far, blank ones included.
    pub fn line_number(&self) -> u64 {
        self.number
    }
}

impl<R: BufRead> Iterator for Lines<R> {
    type Item = std::io::Result<(u64, Result<String, String>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            let n = match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            };
            self.bytes += n as u64;
            self.number += 1;
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line = match std::str::from_utf8(&self.buf) {
                Ok(s) => Ok(s.to_string()),
                Err(e) => Err(format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1)),
            };
            return Some(Ok((self.number, line)));
        }
    }
}

/// The text in `field` (`data.text_field`, usually "text") of one jsonl line, or why the line
/// is unusable.
pub fn parse_line(line: &str, field: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    match v.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{field:?} is not a string")),
        None => Err(format!("no {field:?} field")),
    }
}

/// Lines skipped as malformed: how many, and the first few line numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Skipped {
    pub count: u64,
    pub first: Vec<u64>,
}

impl Skipped {
    pub fn add(&mut self, line: u64) {
        self.count += 1;
        if self.first.len() < FIRST_SKIPPED {
            self.first.push(line);
        }
    }

    /// `2 malformed line(s) skipped (lines 41, 42)`, or nothing when none were.
    pub fn describe(&self) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let list: Vec<String> = self.first.iter().map(u64::to_string).collect();
        let more = if self.count > self.first.len() as u64 { ", ..." } else { "" };
        Some(format!("{} malformed line(s) skipped (line {}{more})", self.count, list.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_skip_blanks_and_flag_bad_utf8() {
        let data: &[u8] = b"{\"text\": \"a\"}\n\n  \n\xff\xfe\n{\"text\": \"b\"}";
        let got: Vec<(u64, Result<String, String>)> = Lines::new(data).map(Result::unwrap).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (1, Ok("{\"text\": \"a\"}\n".to_string())));
        assert_eq!(got[1].0, 4);
        assert!(got[1].1.as_ref().unwrap_err().contains("invalid UTF-8"), "{got:?}");
        assert_eq!(got[2], (5, Ok("{\"text\": \"b\"}".to_string())));
    }

    #[test]
    fn skipped_keeps_the_first_few() {
        let mut s = Skipped::default();
        assert_eq!(s.describe(), None);
        for line in [3, 9, 10, 11, 12, 40] {
            s.add(line);
        }
        assert_eq!(s.count, 6);
        assert_eq!(s.first, [3, 9, 10, 11, 12]);
        assert_eq!(s.describe().unwrap(), "6 malformed line(s) skipped (line 3, 9, 10, 11, 12, ...)");
    }
}
