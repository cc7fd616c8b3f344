//! The report of `bench relay`: one row per figure, rendered as an aligned table.

use std::fmt::Write as _;

// ---------------------------------------------------------------------------------------------
// The summary table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Pass,
    Fail,
    Info,
    Error,
}

impl Verdict {
    pub(super) fn of(pass: bool) -> Self {
        if pass {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
}

#[derive(Debug)]
pub(super) struct Row {
    pub(super) metric: String,
    pub(super) relay: String,
    pub(super) baseline: String,
    pub(super) ratio: String,
    pub(super) target: String,
    pub(super) verdict: Verdict,
}

impl Row {
    pub(super) fn error(part: &str, e: &anyhow::Error) -> Row {
        // The full error was printed when it happened; the table only needs a reminder.
        let msg: String = format!("{e:#}").chars().take(60).collect();
        Row {
            metric: part.to_owned(),
            relay: msg,
            baseline: "-".to_owned(),
            ratio: "-".to_owned(),
            target: "-".to_owned(),
            verdict: Verdict::Error,
        }
    }
}

pub(super) fn render(rows: &[Row]) -> String {
    let header = ["metric", "relay", "baseline", "ratio", "target", "result"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let verdict = match r.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::Info => "info",
                Verdict::Error => "ERROR",
            };
            [
                r.metric.clone(),
                r.relay.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                r.target.clone(),
                verdict.to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::new();
        for (c, w) in cols.iter().zip(widths) {
            let _ = write!(s, "| {c}{} ", " ".repeat(w - c.chars().count()));
        }
        s.push_str("|\n");
        s
    };
    let mut out = line(&header.map(str::to_owned));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

pub(super) fn pct(fraction: f64) -> String {
    format!("{:.3} %", fraction * 100.0)
}

/// `relay / baseline`, or "n/a" when the baseline is zero (e.g. no loss on the direct path).
pub(super) fn ratio(relay: f64, baseline: f64) -> String {
    if baseline > 0.0 && relay.is_finite() {
        format!("{:.2}x", relay / baseline)
    } else {
        "n/a".to_owned()
    }
}

/// Compact counts and rates: 1.23M, 250k, 950.
pub(super) fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = [Row {
            metric: "m".into(),
            relay: "1 µs".into(),
            baseline: "b".into(),
            ratio: ratio(2.0, 1.0),
            target: "t".into(),
            verdict: Verdict::Pass,
        }];
        let out = render(&rows);
        let widths: Vec<usize> = out.lines().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{out}");
        assert!(out.contains("2.00x") && out.contains("PASS"));
        assert_eq!(si(250_000.0), "250.0k");
        assert_eq!(ratio(1.0, 0.0), "n/a");
    }
}
