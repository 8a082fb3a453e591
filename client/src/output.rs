//! Output helpers: aligned tables, sizes, timestamps, JSON.

use std::io::Write;

use serde_json::Value;

/// Render rows under headers as left-aligned columns separated by two
/// spaces, one line per row, trailing spaces trimmed.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(cur) => *cur = (*cur).max(w),
                None => widths.push(w),
            }
        }
    }
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(&format!("{cell:<width$}", width = widths[i]));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes in binary units: `512B`, `1.00KiB`, `256.00MiB`.
pub fn format_bytes(n: i64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n.abs() < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v.abs() < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2}{unit}")
}

/// RFC 3339 timestamp as `2026/11/22 01:00 UTC`; empty or unparsable input
/// is returned as is (the zero time becomes empty).
pub fn format_time(ts: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(ts) {
        Ok(t) if t.timestamp() <= 0 => String::new(),
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y/%m/%d %H:%M UTC")
            .to_string(),
        Err(_) => ts.to_string(),
    }
}

/// `container` -> `CONTAINER`, `virtual-machine` -> `VIRTUAL-MACHINE` (empty
/// counts as container, as Incus does).
pub fn type_label(t: &str) -> String {
    if t.is_empty() {
        "CONTAINER".into()
    } else {
        t.to_uppercase()
    }
}

/// A JSON value printed as a plain string (strings without quotes).
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Pretty JSON with a final newline.
pub fn pretty_json(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s
}

/// Write text to stdout, ignoring a closed pipe.
pub fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["c1".to_string(), "RUNNING".to_string(), "1234".to_string()],
            vec![
                "longer-name".to_string(),
                "STOPPED".to_string(),
                String::new(),
            ],
        ];
        let t = render_table(&["NAME", "STATUS", "PID"], &rows);
        assert_eq!(
            t,
            "NAME         STATUS   PID\n\
             c1           RUNNING  1234\n\
             longer-name  STOPPED\n"
        );
    }

    #[test]
    fn table_without_rows_is_header_only() {
        assert_eq!(render_table(&["A", "BB"], &[]), "A  BB\n");
    }

    #[test]
    fn bytes() {
        assert_eq!(format_bytes(0), "0B");
        assert_eq!(format_bytes(1023), "1023B");
        assert_eq!(format_bytes(1024), "1.00KiB");
        assert_eq!(format_bytes(1_048_576), "1.00MiB");
        assert_eq!(format_bytes(256 * 1024 * 1024 + 512 * 1024), "256.50MiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024), "3.00GiB");
    }

    #[test]
    fn times() {
        assert_eq!(format_time("2026-11-22T01:00:00Z"), "2026/11/22 01:00 UTC");
        assert_eq!(
            format_time("2026-11-22T03:30:00+02:00"),
            "2026/11/22 01:30 UTC"
        );
        assert_eq!(format_time("1970-01-01T00:00:00Z"), "");
        assert_eq!(format_time(""), "");
        assert_eq!(format_time("garbage"), "garbage");
    }

    #[test]
    fn labels_and_values() {
        assert_eq!(type_label("virtual-machine"), "VIRTUAL-MACHINE");
        assert_eq!(type_label(""), "CONTAINER");
        assert_eq!(value_text(&serde_json::json!("40%")), "40%");
        assert_eq!(value_text(&serde_json::json!(3)), "3");
        assert_eq!(value_text(&Value::Null), "");
    }
}
