//! The report's chart, as hand-written SVG: two horizontal bar panels (throughput ratio to the
//! baseline; added p50/p99 at 1,000 rps). Plain `<rect>`/`<text>` render anywhere, with no font
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

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
