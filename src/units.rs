//! Numbers for people: one format for large counts and one for durations, used by every
//! table and message (the engine's included), so they sit on the floor under all of them.

/// One format for every large number: 145.0M, 1.2K, 3.4G, 512.
pub fn human(x: f64) -> String {
    const UNITS: [(f64, &str); 5] = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")];
    for (scale, unit) in UNITS {
        if x.abs() >= scale {
            return format!("{:.1}{unit}", x / scale);
        }
    }
    if x.fract() == 0.0 { format!("{x:.0}") } else { format!("{x:.1}") }
}

/// A duration in seconds, readably: 45s, 3m12s, 1h04m, 2d03h.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.max(0.0).round() as u64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_and_duration_tables() {
        for (x, want) in
            [(145.0e6, "145.0M"), (25_830_000.0, "25.8M"), (1234.0, "1.2K"), (512.0, "512"), (3.4e9, "3.4G")]
        {
            assert_eq!(human(x), want);
        }
        for (s, want) in [(45.0, "45s"), (192.0, "3m12s"), (3840.0, "1h04m"), (183_600.0, "2d03h")] {
            assert_eq!(duration(s), want);
        }
    }
}
