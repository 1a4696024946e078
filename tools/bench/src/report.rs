//! The harness's output: a side-by-side table (tagstore, Redis, ratio), a
//! JSON file with every figure, and SVG plots.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// Which way is better for a row's figures.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
pub enum Better {
    Higher,
    Lower,
}

/// One row: a figure for tagstore, the same for Redis when there is one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub tagstore: Option<f64>,
    pub redis: Option<f64>,
    pub better: Better,
}

impl Row {
    /// How many times better tagstore is (> 1 means tagstore wins).
    pub fn ratio(&self) -> Option<f64> {
        let (t, r) = (self.tagstore?, self.redis?);
        if t <= 0.0 || r <= 0.0 {
            return None;
        }
        Some(match self.better {
            Better::Higher => t / r,
            Better::Lower => r / t,
        })
    }
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub extra: serde_json::Map<String, Value>,
}

pub fn human(v: f64, unit: &str) -> String {
    match unit {
        "bytes" => {
            let units = ["B", "KiB", "MiB", "GiB"];
            let (mut x, mut i) = (v, 0);
            while x >= 1024.0 && i + 1 < units.len() {
                x /= 1024.0;
                i += 1;
            }
            format!("{x:.1} {}", units[i])
        }
        "ms" if v < 1.0 => format!("{:.0} µs", v * 1e3),
        "ms" => format!("{v:.1} ms"),
        "/s" if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
        "/s" if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
        "/s" => format!("{v:.0} /s"),
        _ => format!("{v:.2} {unit}"),
    }
}

impl Report {
    /// Adds a row and prints it at once.
    pub fn add(
        &mut self,
        scenario: &str,
        metric: &str,
        unit: &str,
        better: Better,
        tagstore: Option<f64>,
        redis: Option<f64>,
    ) {
        let row = Row {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            tagstore,
            redis,
            better,
        };
        println!("{}", Self::line(&row));
        self.rows.push(row);
    }

    fn line(r: &Row) -> String {
        let f = |v: Option<f64>| v.map(|x| human(x, &r.unit)).unwrap_or_else(|| "-".into());
        let ratio = r
            .ratio()
            .map(|x| format!("{x:.2}×"))
            .unwrap_or_else(|| "-".into());
        format!(
            "  {:<9} {:<52} {:>12} {:>12} {:>8}",
            r.scenario,
            r.metric,
            f(r.tagstore),
            f(r.redis),
            ratio
        )
    }

    pub fn header() -> String {
        format!(
            "  {:<9} {:<52} {:>12} {:>12} {:>8}\n  {}",
            "scenario",
            "metric",
            "tagstore",
            "redis",
            "ratio",
            "-".repeat(9 + 52 + 12 + 12 + 8 + 4)
        )
    }

    pub fn table(&self) -> String {
        let mut out = Self::header();
        for r in &self.rows {
            out.push('\n');
            out.push_str(&Self::line(r));
        }
        out.push_str("\n  (ratio: how many times better tagstore is; > 1 means tagstore wins)");
        out
    }

    pub fn json(&self) -> Value {
        let mut v = self.extra.clone();
        v.insert(
            "rows".into(),
            json!(self.rows.iter().map(|r| json!({
            "scenario": r.scenario, "metric": r.metric, "unit": r.unit, "better": r.better,
            "tagstore": r.tagstore, "redis": r.redis, "ratio": r.ratio(),
        })).collect::<Vec<_>>()),
        );
        Value::Object(v)
    }
}

/// A named, coloured series of (x, y) points.
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// How a tick of a log axis at 10^e is labelled.
pub type Tick = fn(i64) -> String;

/// 10^e as a percentage: `0.01%`, `1%`, `100%`.
pub fn percent_tick(e: i64) -> String {
    let places = usize::try_from(-(e + 2)).unwrap_or(0);
    format!("{:.*}%", places, 10f64.powi((e + 2) as i32))
}

/// 10^e milliseconds, in the unit that reads best: `10 µs`, `1 ms`, `10 s`.
pub fn millis_tick(e: i64) -> String {
    match e {
        ..=-4 => format!("{} ns", 10f64.powi((e + 6) as i32)),
        -3..=-1 => format!("{} µs", 10f64.powi((e + 3) as i32)),
        0..=2 => format!("{} ms", 10f64.powi(e as i32)),
        _ => format!("{} s", 10f64.powi((e - 3) as i32)),
    }
}

/// Approximate width in pixels of `text` at 12 px sans-serif (for laying out
/// the legend so that it is never cut off).
fn text_px(text: &str) -> f64 {
    text.chars().count() as f64 * 7.2
}

/// A line chart with log-log axes: one polyline per series of (x, y) points,
/// ticks labelled by `x_tick` and `y_tick`, the legend on the right as wide
/// as its longest name.
pub fn log_log_svg(
    title: &str,
    (x_label, x_tick): (&str, Tick),
    (y_label, y_tick): (&str, Tick),
    series: &[Series<'_>],
) -> String {
    let longest = series.iter().map(|s| text_px(s.0)).fold(0.0, f64::max);
    let (ml, mr, mt, mb) = (80.0, (46.0 + longest).max(120.0), 40.0, 60.0);
    let (w, h) = (ml + 470.0 + mr, 440.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|p| p.0 > 0.0 && p.1 > 0.0)
        .collect();
    if pts.is_empty() {
        return String::new();
    }
    let lx = |v: f64| v.log10();
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| {
        (a.0.min(lx(p.0)), a.1.max(lx(p.0)))
    });
    let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| {
        (a.0.min(lx(p.1)), a.1.max(lx(p.1)))
    });
    let (x0, x1) = (x0.floor(), x1.ceil().max(x0.floor() + 1.0));
    let (y0, y1) = (y0.floor(), y1.ceil().max(y0.floor() + 1.0));
    let sx = |v: f64| ml + (lx(v) - x0) / (x1 - x0) * (w - ml - mr);
    let sy = |v: f64| h - mb - (lx(v) - y0) / (y1 - y0) * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>"#,
        w / 2.0
    );
    for e in (x0 as i64)..=(x1 as i64) {
        let x = ml + (e as f64 - x0) / (x1 - x0) * (w - ml - mr);
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{mt}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            h - mb,
            h - mb + 18.0,
            x_tick(e)
        );
    }
    for e in (y0 as i64)..=(y1 as i64) {
        let y = h - mb - (e as f64 - y0) / (y1 - y0) * (h - mt - mb);
        let _ = write!(
            s,
            r##"<line x1="{ml}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            w - mr,
            ml - 6.0,
            y + 4.0,
            y_tick(e)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        (ml + w - mr) / 2.0,
        h - 16.0
    );
    let _ = write!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{y_label}</text>"#,
        (mt + h - mb) / 2.0,
        (mt + h - mb) / 2.0
    );
    for (i, (name, color, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .filter(|p| p.0 > 0.0 && p.1 > 0.0)
            .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in points.iter().filter(|p| p.0 > 0.0 && p.1 > 0.0) {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                sx(p.0),
                sy(p.1)
            );
        }
        let ly = mt + 20.0 + i as f64 * 20.0;
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{name}</text>"#,
            w - mr + 10.0,
            w - mr + 30.0,
            w - mr + 36.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Grouped bars: for each group, one bar per series (log scale on y).
pub fn bars_svg(
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(&str, &str, Vec<f64>)],
) -> String {
    let (w, h, ml, mt, mb) = (90.0 + groups.len() as f64 * 120.0, 420.0, 70.0, 40.0, 110.0);
    let vals: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|v| *v > 0.0)
        .collect();
    if vals.is_empty() {
        return String::new();
    }
    let (y0, y1) = vals.iter().fold((f64::MAX, f64::MIN), |a, v| {
        (a.0.min(v.log10()), a.1.max(v.log10()))
    });
    let (y0, y1) = (y0.floor() - 0.0, y1.ceil().max(y0.floor() + 1.0));
    let sy = |v: f64| h - mb - (v.log10() - y0) / (y1 - y0) * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>"#,
        w / 2.0
    );
    for e in (y0 as i64)..=(y1 as i64) {
        let y = sy(10f64.powi(e as i32));
        let _ = write!(
            s,
            r##"<line x1="{ml}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">1e{e}</text>"##,
            w - 10.0,
            ml - 6.0,
            y + 4.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{y_label}</text>"#,
        (mt + h - mb) / 2.0,
        (mt + h - mb) / 2.0
    );
    let bw = 100.0 / series.len().max(1) as f64;
    for (g, name) in groups.iter().enumerate() {
        let gx = ml + 10.0 + g as f64 * 120.0;
        for (i, (_, color, v)) in series.iter().enumerate() {
            if let Some(&val) = v.get(g).filter(|v| **v > 0.0) {
                let y = sy(val);
                let _ = write!(
                    s,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                    gx + i as f64 * bw,
                    bw - 4.0,
                    (h - mb - y).max(0.0)
                );
            }
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="end" transform="rotate(-35 {:.1} {})">{name}</text>"#,
            gx + 50.0,
            h - mb + 16.0,
            gx + 50.0,
            h - mb + 16.0
        );
    }
    for (i, (name, color, _)) in series.iter().enumerate() {
        let x = ml + 10.0 + i as f64 * 140.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="32" width="12" height="12" fill="{color}"/><text x="{}" y="42">{name}</text>"#,
            x + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_plots() {
        let r = Row {
            scenario: "q".into(),
            metric: "m".into(),
            unit: "ms".into(),
            tagstore: Some(1.0),
            redis: Some(4.0),
            better: Better::Lower,
        };
        assert_eq!(r.ratio(), Some(4.0));
        let svg = log_log_svg(
            "t",
            ("x", percent_tick),
            ("y", millis_tick),
            &[("a", "red", vec![(0.0001, 0.1), (0.5, 2.0)])],
        );
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        for label in [
            ">0.01%<",
            ">0.1%<",
            ">1%<",
            ">100%<",
            ">100 µs<",
            ">1 ms<",
            ">10 ms<",
        ] {
            assert!(svg.contains(label), "no tick {label}");
        }
        assert!(!svg.contains(">1e-4<"));
        // The legend fits: its longest name ends inside the picture.
        let long = "redis BITOP+BITCOUNT and a longer name";
        let svg = log_log_svg(
            "t",
            ("x", percent_tick),
            ("y", millis_tick),
            &[(long, "red", vec![(0.001, 0.1), (0.5, 2.0)])],
        );
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        let x: f64 = svg
            .split(&format!(">{long}<"))
            .next()
            .and_then(|before| before.rsplit("<text x=\"").next())
            .and_then(|r| r.split('"').next())
            .and_then(|x| x.parse().ok())
            .unwrap();
        assert!(
            x + text_px(long) <= width,
            "legend ends at {} of {width}",
            x + text_px(long)
        );
        let svg = bars_svg("t", "y", &["g".into()], &[("a", "red", vec![3.0])]);
        assert!(svg.contains("<rect x="));
        assert_eq!(human(1536.0, "bytes"), "1.5 KiB");
    }
}
