//! Hand-written SVG line plots: `loss.svg` (train and eval loss by step) and `retention.svg`
//! (general-text and domain perplexity by step).

use crate::metrics::Metrics;
use crate::render::escape;

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// One line of a plot.
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut t = start;
    while t <= hi + step * 1e-9 && out.len() < 50 {
        out.push(t);
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn line_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    note: Option<&str>,
) -> String {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1) = (0.0f64, 1.0f64);
    let (mut y0, mut y1) = (0.0f64, 1.0f64);
    if !all.is_empty() {
        x0 = all
            .iter()
            .map(|p| p.0)
            .fold(f64::INFINITY, f64::min)
            .min(0.0);
        x1 = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        y0 = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        y1 = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(y1.abs() * 0.01).max(1e-6);
        y0 -= pad;
        y1 += pad;
    }
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    s.push_str(&format!(
        "<rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        escape(title)
    ));
    // Axes, ticks and grid.
    s.push_str(&format!(
        "<g stroke=\"black\"><line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"/><line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\"/></g>\n",
        TOP + ph,
        LEFT + pw,
        TOP + ph,
        TOP + ph
    ));
    for t in ticks(x0, x1, 6) {
        let x = sx(t);
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"black\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 18.0,
            label(t)
        ));
    }
    for t in ticks(y0, y1, 5) {
        let y = sy(t);
        s.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{LEFT}\" y2=\"{y:.1}\" stroke=\"black\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            LEFT,
            LEFT + pw,
            LEFT - 5.0,
            LEFT - 8.0,
            y + 4.0,
            label(t)
        ));
    }
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n<text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        LEFT + pw / 2.0,
        H - 18.0,
        escape(x_label),
        TOP + ph / 2.0,
        escape(y_label)
    ));
    // Lines (a single point is drawn as a dot).
    for se in series {
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        if pts.len() > 1 {
            s.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
                se.color,
                pts.join(" ")
            ));
        }
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            s.push_str(&format!(
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{}\"/>\n",
                se.color
            ));
        }
    }
    // Legend.
    for (i, se) in series.iter().enumerate() {
        let y = TOP + 10.0 + 18.0 * i as f64;
        let x = LEFT + pw - 170.0;
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            x + 24.0,
            se.color,
            x + 30.0,
            y + 4.0,
            escape(se.name)
        ));
    }
    if let Some(n) = note {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{}</text>\n",
            LEFT + pw / 2.0,
            TOP + ph / 2.0,
            escape(n)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Train loss (every step row) and eval loss (every eval row) by step.
pub fn loss_svg(metrics: &Metrics) -> String {
    let train = Series {
        name: "train loss",
        color: "#1f77b4",
        points: metrics
            .train_loss
            .iter()
            .map(|(s, l)| (*s as f64, *l))
            .collect(),
    };
    let eval = Series {
        name: "eval loss",
        color: "#d62728",
        points: metrics
            .evals
            .iter()
            .map(|e| (e.step as f64, e.loss))
            .collect(),
    };
    let note = (metrics.train_loss.is_empty() && metrics.evals.is_empty())
        .then_some("no metrics recorded");
    line_plot(
        "Loss",
        "step",
        "loss (nats per token)",
        &[train, eval],
        note,
    )
}

/// General-text (retention) and domain (eval) perplexity by step; without retention rows,
/// domain only, with a note saying so.
pub fn retention_svg(metrics: &Metrics) -> String {
    let domain = Series {
        name: "domain (eval) perplexity",
        color: "#d62728",
        points: metrics
            .evals
            .iter()
            .map(|e| (e.step as f64, e.perplexity))
            .collect(),
    };
    if metrics.retention.is_empty() {
        return line_plot(
            "Perplexity",
            "step",
            "perplexity",
            &[domain],
            Some("no retention data: set [retention] data to track general text"),
        );
    }
    let general = Series {
        name: "general-text perplexity",
        color: "#2ca02c",
        points: metrics
            .retention
            .iter()
            .map(|r| (r.step as f64, r.perplexity))
            .collect(),
    };
    line_plot("Perplexity", "step", "perplexity", &[general, domain], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(2.31, 2.97, 5);
        assert!(
            t.len() >= 3 && t[0] >= 2.31 && *t.last().unwrap() <= 2.97,
            "{t:?}"
        );
        assert_eq!(label(0.25), "0.25");
        assert_eq!(label(3.0), "3");
    }
}
