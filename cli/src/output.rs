//! Tables for people, JSON for scripts.

use serde_json::Value;

/// Output mode selected by `--json`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Print `rows` (with `headers`) as an aligned table, or `json` verbatim.
    pub fn table(&self, headers: &[&str], rows: &[Vec<String>], json: &Value) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(json).unwrap_or_default());
            return;
        }
        print!("{}", render_table(headers, rows));
    }

    /// Print a single value: `human` for people, `json` for scripts.
    pub fn value(&self, human: &str, json: &Value) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(json).unwrap_or_default());
        } else {
            println!("{human}");
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: &mut dyn Iterator<Item = String>, out: &mut String| {
        let mut parts = Vec::new();
        for (i, c) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            parts.push(format!("{c:<w$}"));
        }
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().map(|h| h.to_string()), &mut out);
    for row in rows {
        line(&mut row.iter().cloned(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = render_table(
            &["ID", "HOST"],
            &[
                vec!["1".into(), "github.com".into()],
                vec!["22".into(), "x".into()],
            ],
        );
        assert_eq!(t, "ID  HOST\n1   github.com\n22  x\n");
    }
}
