//! The reports' charts, as hand-written SVG: the hop's two horizontal bar panels (throughput
//! ratio to the baseline; added p50/p99 at 1,000 rps), and `--scale`'s curves (a figure against
//! a node's size, on a log scale). Plain `<rect>`/`<line>`/`<text>` render anywhere, with no font
//! files or plotting crate needed at build time.

use std::fmt::Write as _;

use super::summary::Figures;

const WIDTH: f64 = 900.0;
const LABEL: f64 = 120.0;
const ROW: f64 = 26.0;
const TOP: f64 = 46.0;

pub fn svg(figures: &[Figures]) -> String {
    let rows: Vec<&Figures> = figures.iter().filter(|f| f.has_proxy).collect();
    let panel_height = TOP + ROW * rows.len() as f64 + 24.0;
    let height = panel_height * 2.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let ratio = |f: &Figures| f.ratio.map_or(0.0, |s| s.median);
    panel(
        &mut out,
        0.0,
        "Throughput (wrk -c64, keep-alive), ratio to direct; target ≥ 0.33 for mesh-l7",
        &rows,
        &[("ratio", "#3b75af", &ratio)],
        Some(0.33),
        |v| format!("{v:.2}"),
    );
    let p50 = |f: &Figures| f.added_p50_us.map_or(0.0, |s| s.median);
    let p99 = |f: &Figures| f.added_p99_us.map_or(0.0, |s| s.median);
    panel(
        &mut out,
        panel_height,
        "Added latency at 1,000 rps vs direct, µs (p50 blue, p99 orange)",
        &rows,
        &[("p50", "#3b75af", &p50), ("p99", "#ef8636", &p99)],
        None,
        |v| format!("{v:.0}"),
    );
    out.push_str("</svg>\n");
    out
}

type Value<'a> = &'a dyn Fn(&Figures) -> f64;

fn panel(
    out: &mut String,
    y0: f64,
    title: &str,
    rows: &[&Figures],
    series: &[(&str, &str, Value)],
    marker: Option<f64>,
    format: impl Fn(f64) -> String,
) {
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        y0 + 22.0,
        escape(title)
    );
    let max = rows
        .iter()
        .flat_map(|f| series.iter().map(move |(_, _, value)| value(f)))
        .chain(marker)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let plot = WIDTH - LABEL - 70.0;
    let scale = |v: f64| v.max(0.0) / max * plot;
    let bar = (ROW - 6.0) / series.len() as f64;
    for (i, figures) in rows.iter().enumerate() {
        let y = y0 + TOP + ROW * i as f64;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            LABEL - 8.0,
            y + ROW / 2.0,
            escape(&figures.scenario)
        );
        for (j, (_, color, value)) in series.iter().enumerate() {
            let v = value(figures);
            let by = y + bar * j as f64;
            let _ = writeln!(
                out,
                "<rect x=\"{LABEL}\" y=\"{by:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                scale(v),
                bar - 1.0,
                LABEL + scale(v) + 4.0,
                by + bar - 3.0,
                format(v)
            );
        }
    }
    if let Some(mark) = marker {
        let x = LABEL + scale(mark);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#c00\" \
             stroke-dasharray=\"4 3\"/>",
            y0 + TOP - 4.0,
            y0 + TOP + ROW * rows.len() as f64
        );
    }
}

/// One panel of [`curves`]: `points` are (size, figure), sizes > 0.
pub struct Curve<'a> {
    pub title: &'a str,
    pub points: Vec<(f64, f64)>,
    pub format: fn(f64) -> String,
}

const CURVE_HEIGHT: f64 = 170.0;

/// Panels stacked, each a curve over the same sizes (log x, y from 0).
pub fn curves(panels: &[Curve]) -> String {
    let height = CURVE_HEIGHT * panels.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, curve) in panels.iter().enumerate() {
        curve_panel(&mut out, CURVE_HEIGHT * i as f64, curve);
    }
    out.push_str("</svg>\n");
    out
}

fn curve_panel(out: &mut String, y0: f64, curve: &Curve) {
    let _ = writeln!(
        out,
        "<text x=\"10\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        y0 + 22.0,
        escape(curve.title)
    );
    let (left, right) = (LABEL, WIDTH - 60.0);
    let (top, bottom) = (y0 + 40.0, y0 + CURVE_HEIGHT - 30.0);
    let log = |x: f64| x.max(1.0).log10();
    let (min_x, max_x) = curve
        .points
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &(x, _)| {
            (lo.min(log(x)), hi.max(log(x)))
        });
    let max_y = curve
        .points
        .iter()
        .map(|p| p.1)
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.15;
    let px = |x: f64| left + (log(x) - min_x) / (max_x - min_x).max(1e-9) * (right - left);
    let py = |y: f64| bottom - y.max(0.0) / max_y * (bottom - top);
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"#888\"/>\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"#888\"/>\
         <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">0</text>",
        left - 6.0,
        bottom + 4.0
    );
    let path: Vec<String> = curve
        .points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let _ = writeln!(
        out,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#3b75af\" stroke-width=\"2\"/>",
        path.join(" ")
    );
    for &(x, y) in &curve.points {
        let _ = writeln!(
            out,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#3b75af\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{x:.0}</text>",
            px(x),
            py(y),
            px(x),
            py(y) - 8.0,
            (curve.format)(y),
            px(x),
            bottom + 16.0,
        );
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
