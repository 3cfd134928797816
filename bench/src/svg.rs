//! A hand-written SVG plot of latency distributions: one row per series,
//! every sample as a dot, a box from p50 to p90 with the median marked, and
//! a whisker to the maximum. No plotting crate: the picture is simple and
//! the output stays small and diffable.

use std::fmt::Write;

use crate::stats::summarize;

/// One row of the plot.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its label, left of the row.
    pub label: String,
    /// Colour group: rows of one mode share a colour.
    pub group: usize,
    /// The samples, in milliseconds.
    pub samples: Vec<f64>,
}

const PALETTE: [&str; 6] = [
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
];
const WIDTH: f64 = 960.0;
const LEFT: f64 = 300.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 48.0;
const ROW: f64 = 30.0;
const BOTTOM: f64 = 56.0;

/// Escapes text for SVG content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A round axis end at or above `max`, and a tick step (1, 2 or 5 × 10^k)
/// giving 4 to 10 ticks.
pub fn axis(max: f64) -> (f64, f64) {
    if !max.is_finite() || max <= 0.0 {
        return (1.0, 0.25);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| max / s <= 10.0)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// Ends on the 1-2-5 ladder (1, 2, 5 times a power of ten) around
/// `lo..=hi` (both positive), and the ladder's steps between them as ticks.
pub fn log_axis(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let ladder = |v: f64| {
        let d = 10f64.powf(v.log10().floor());
        [d, 2.0 * d, 5.0 * d, 10.0 * d]
    };
    let eps = 1.0 + 1e-9;
    let start = ladder(lo)
        .into_iter()
        .filter(|t| *t <= lo * eps)
        .fold(f64::NAN, f64::max);
    let end = ladder(hi)
        .into_iter()
        .find(|t| *t >= hi / eps)
        .unwrap_or(hi)
        .max(start * 2.0);
    let mut ticks = Vec::new();
    let mut d = 10f64.powf(start.log10().floor());
    while d <= end * eps {
        for t in [d, 2.0 * d, 5.0 * d] {
            if t >= start / eps && t <= end * eps {
                ticks.push(t);
            }
        }
        d *= 10.0;
    }
    (start, end, ticks)
}

/// Whether samples spanning `lo..=hi` read better on a log scale: when
/// the fastest would otherwise be squashed against the axis (a pool start
/// of 0.1 s beside a cold one of 3 s).
pub fn wants_log(lo: f64, hi: f64) -> bool {
    lo > 0.0 && hi / lo > 20.0
}

/// The plot as a complete SVG document; the x axis is logarithmic when the
/// samples span more than a factor of 20.
pub fn plot(title: &str, x_label: &str, series: &[Series]) -> String {
    let height = TOP + ROW * series.len().max(1) as f64 + BOTTOM;
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.samples.iter().copied())
            .filter(|x| x.is_finite())
    };
    let max = finite().fold(0.0, f64::max);
    let min_pos = finite().filter(|x| *x > 0.0).fold(f64::INFINITY, f64::min);
    let plot_w = WIDTH - LEFT - RIGHT;
    let log = wants_log(min_pos, max);
    let (ticks, x): (Vec<f64>, Box<dyn Fn(f64) -> f64>) = if log {
        let (start, end, ticks) = log_axis(min_pos, max);
        let (l0, l1) = (start.log10(), end.log10());
        (
            ticks,
            Box::new(move |v: f64| LEFT + plot_w * ((v.max(start).log10() - l0) / (l1 - l0))),
        )
    } else {
        let (end, step) = axis(max);
        let n = (end / step).round() as usize;
        (
            (0..=n).map(|i| i as f64 * step).collect(),
            Box::new(move |v: f64| LEFT + plot_w * (v.max(0.0) / end)),
        )
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        o,
        r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        o,
        r#"<text x="10" y="24" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let bottom = TOP + ROW * series.len().max(1) as f64;
    // Grid and ticks.
    for t in ticks {
        let xt = x(t);
        let _ = writeln!(
            o,
            r##"<line x1="{xt:.1}" y1="{TOP}" x2="{xt:.1}" y2="{bottom}" stroke="#ddd"/><text x="{xt:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}{}</text>"#,
        LEFT + plot_w / 2.0,
        bottom + 38.0,
        escape(x_label),
        if log { " (log scale)" } else { "" }
    );
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[s.group % PALETTE.len()];
        let yc = TOP + ROW * i as f64 + ROW / 2.0;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 10.0,
            yc + 4.0,
            escape(&s.label)
        );
        let st = summarize(&s.samples);
        if st.n == 0 {
            continue;
        }
        let (x50, x90, xmax) = (x(st.p50), x(st.p90), x(st.max));
        let _ = writeln!(
            o,
            r#"<line x1="{x90:.1}" y1="{yc:.1}" x2="{xmax:.1}" y2="{yc:.1}" stroke="{color}"/><line x1="{xmax:.1}" y1="{:.1}" x2="{xmax:.1}" y2="{:.1}" stroke="{color}"/>"#,
            yc - 5.0,
            yc + 5.0
        );
        let _ = writeln!(
            o,
            r#"<rect x="{x50:.1}" y="{:.1}" width="{:.1}" height="16" fill="{color}" fill-opacity="0.25" stroke="{color}"/><line x1="{x50:.1}" y1="{:.1}" x2="{x50:.1}" y2="{:.1}" stroke="{color}" stroke-width="3"/>"#,
            yc - 8.0,
            (x90 - x50).max(0.5),
            yc - 10.0,
            yc + 10.0
        );
        for (k, v) in s.samples.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            // A fixed jitter spreads equal samples without randomness.
            let dy = ((k * 7) % 9) as f64 - 4.0;
            let _ = writeln!(
                o,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#,
                x(*v),
                yc + dy
            );
        }
    }
    let _ = writeln!(
        o,
        r##"<text x="{LEFT}" y="{:.1}" fill="#666">dots: samples; box: p50 to p90 (thick line: p50); whisker: to max</text>"##,
        height - 4.0
    );
    o.push_str("</svg>\n");
    o
}

fn fmt_tick(v: f64) -> String {
    if v >= 10_000.0 && (v / 1000.0).fract().abs() < 1e-9 {
        // Keeps the labels of a log axis's upper decades apart.
        format!("{:.0}k", v / 1000.0)
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        // Ticks of a log axis below 1 are powers of ten times 1, 2 or 5.
        let s = format!("{v:.6}");
        s.trim_end_matches('0').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_is_round_and_covers_the_maximum() {
        assert_eq!(axis(0.0), (1.0, 0.25));
        assert_eq!(axis(f64::NAN), (1.0, 0.25));
        for max in [0.3, 1.0, 7.0, 99.0, 1234.0, 3300.0, 98765.0] {
            let (end, step) = axis(max);
            assert!(end >= max, "{max}: {end}");
            let ticks = end / step;
            assert!((1.0..=10.0).contains(&ticks), "{max}: {ticks} ticks");
            assert!((ticks - ticks.round()).abs() < 1e-9);
        }
        assert_eq!(axis(3300.0), (3500.0, 500.0));
    }

    #[test]
    fn log_axis_spans_whole_decades() {
        let (start, end, ticks) = log_axis(95.0, 3300.0);
        assert_eq!((start, end), (50.0, 5000.0));
        assert_eq!(ticks, [50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]);
        let (start, end, ticks) = log_axis(1.5, 15900.0);
        assert_eq!((start, end), (1.0, 20000.0));
        assert_eq!(ticks.first(), Some(&1.0));
        assert_eq!(ticks.last(), Some(&20000.0));
        let (start, end, ticks) = log_axis(100.0, 100.0);
        assert_eq!((start, end), (100.0, 200.0));
        assert_eq!(ticks, [100.0, 200.0]);
        assert_eq!(fmt_tick(20000.0), "20k");
        assert_eq!(fmt_tick(5000.0), "5000");
        assert!(wants_log(100.0, 3000.0));
        assert!(!wants_log(2000.0, 8000.0));
        assert!(!wants_log(0.0, 8000.0));
        assert_eq!(fmt_tick(0.5), "0.5");
        assert_eq!(fmt_tick(20.0), "20");
    }

    #[test]
    fn a_wide_spread_is_drawn_on_a_log_axis_inside_the_plot() {
        let series = vec![
            Series {
                label: "pool".into(),
                group: 0,
                samples: vec![90.0, 110.0],
            },
            Series {
                label: "cold".into(),
                group: 1,
                samples: vec![2800.0, 3500.0],
            },
        ];
        let svg = plot("t", "ms", &series);
        assert!(svg.contains("ms (log scale)"));
        let xs: Vec<f64> = svg
            .split("<circle cx=\"")
            .skip(1)
            .map(|c| c.split('"').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 4);
        for cx in &xs {
            assert!((LEFT..=WIDTH - RIGHT).contains(cx), "{cx}");
        }
        // The pool's samples are far from the axis's start, not squashed.
        assert!(xs[0] - LEFT > 50.0, "{xs:?}");
    }

    #[test]
    fn plot_draws_every_series_and_escapes_labels() {
        let series = vec![
            Series {
                label: "baseline <C=1> & co".into(),
                group: 0,
                samples: vec![100.0, 120.0, 110.0],
            },
            Series {
                label: "agent".into(),
                group: 1,
                samples: vec![90.0, f64::NAN, 95.0],
            },
            Series {
                label: "empty".into(),
                group: 2,
                samples: vec![],
            },
        ];
        let svg = plot("start → ready", "ms", &series);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("baseline &lt;C=1&gt; &amp; co"));
        assert!(!svg.contains("<C=1>"));
        // One dot per finite sample, one box per non-empty series.
        assert_eq!(svg.matches("<circle").count(), 5);
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Every element that opens is closed: all tags here are self-closing
        // or have a matching close.
        for tag in ["svg", "text"] {
            assert_eq!(
                svg.matches(&format!("<{tag}")).count(),
                svg.matches(&format!("</{tag}>")).count(),
                "{tag}"
            );
        }
        // Every dot lies inside the plot area.
        for c in svg.split("<circle cx=\"").skip(1) {
            let cx: f64 = c.split('"').next().unwrap().parse().unwrap();
            assert!((LEFT..=WIDTH - RIGHT).contains(&cx), "{cx}");
        }
    }
}
