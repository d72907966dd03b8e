//! The dataset card's charts as SVG: a title, axes with ticks and labels,
//! and a legend. The hub and GitHub draw SVG in a README; its text needs no
//! font on the machine that writes it, and its bytes are the same on every
//! machine: every coordinate and label is printed with a fixed number of
//! decimals, and tick steps are found by multiplying, not by logarithms.

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 360.0;
/// The plot area's distance from each edge: room for ticks, labels, title.
const LEFT: f64 = 72.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 56.0;
pub const BINS: usize = 30;
/// The card's colours: blue for chosen, orange for rejected.
pub const CHOSEN: &str = "#1f77b4";
pub const REJECTED: &str = "#ff7f0e";
const AXIS: &str = "#444444";
const GRID: &str = "#e6e6e6";

/// One histogram of an overlay, named in the legend.
pub struct Series<'a> {
    pub label: &'a str,
    pub values: &'a [f64],
    pub color: &'static str,
}

/// A chart's title and axis labels.
pub struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// A histogram's SVG, and the range its bins cover.
pub struct Histogram {
    pub svg: Vec<u8>,
    pub range: (f64, f64),
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A chart being drawn: the plot area maps `x_range` and `y_range`.
struct Chart {
    out: String,
    x_range: (f64, f64),
    y_range: (f64, f64),
    /// The y axis counts (whole ticks).
    counts: bool,
}

impl Chart {
    fn new(labels: &Labels, x_range: (f64, f64), y_range: (f64, f64), counts: bool) -> Chart {
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} \
             {HEIGHT}\" font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"12\">\n<title>{}</title>\n\
             <rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>\n",
            escape(labels.title)
        );
        let mid = LEFT + (WIDTH - LEFT - RIGHT) / 2.0;
        out += &format!(
            "<text x=\"{mid:.1}\" y=\"26\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
            escape(labels.title)
        );
        out += &format!(
            "<text x=\"{mid:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            HEIGHT - 14.0,
            escape(labels.x)
        );
        let ymid = TOP + (HEIGHT - TOP - BOTTOM) / 2.0;
        out += &format!(
            "<text x=\"18\" y=\"{ymid:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {ymid:.1})\">{}</text>\n",
            escape(labels.y)
        );
        Chart { out, x_range, y_range, counts }
    }

    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x_range.0) / (self.x_range.1 - self.x_range.0) * (WIDTH - LEFT - RIGHT)
    }

    fn py(&self, y: f64) -> f64 {
        HEIGHT - BOTTOM - (y - self.y_range.0) / (self.y_range.1 - self.y_range.0) * (HEIGHT - TOP - BOTTOM)
    }

    /// Horizontal grid lines and labelled ticks on the y axis.
    fn y_ticks(&mut self) {
        let (ticks, decimals) = ticks(self.y_range.0, self.y_range.1, self.counts);
        for t in ticks {
            let y = self.py(t);
            self.out += &format!(
                "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{GRID}\"/>\n\
                 <line x1=\"{:.1}\" x2=\"{LEFT}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{AXIS}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{t:.decimals$}</text>\n",
                WIDTH - RIGHT,
                LEFT - 5.0,
                LEFT - 8.0,
                y + 4.0
            );
        }
    }

    /// Labelled ticks on the x axis at values of its range.
    fn x_ticks(&mut self) {
        let (ticks, decimals) = ticks(self.x_range.0, self.x_range.1, false);
        for t in ticks {
            let label = format!("{t:.decimals$}");
            self.x_tick(self.px(t), &label);
        }
    }

    fn x_tick(&mut self, x: f64, label: &str) {
        let base = HEIGHT - BOTTOM;
        self.out += &format!(
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{base:.1}\" y2=\"{:.1}\" stroke=\"{AXIS}\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            base + 5.0,
            base + 18.0,
            escape(label)
        );
    }

    fn rect(&mut self, (x0, x1): (f64, f64), (y0, y1): (f64, f64), color: &str, opacity: &str) {
        let (left, right, top, bottom) = (self.px(x0), self.px(x1), self.py(y1), self.py(y0));
        self.out += &format!(
            "<rect x=\"{left:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\" \
             fill-opacity=\"{opacity}\"/>\n",
            right - left,
            bottom - top
        );
    }

    /// The legend, top right inside the plot area.
    fn legend(&mut self, entries: &[(String, &str)]) {
        let x = WIDTH - RIGHT - 190.0;
        for (i, (label, color)) in entries.iter().enumerate() {
            let y = TOP + 8.0 + 18.0 * i as f64;
            self.out += &format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"12\" height=\"12\" fill=\"{color}\" fill-opacity=\"0.6\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                x + 18.0,
                y + 10.0,
                escape(label)
            );
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let (base, right) = (HEIGHT - BOTTOM, WIDTH - RIGHT);
        self.out += &format!(
            "<line x1=\"{LEFT}\" x2=\"{right:.1}\" y1=\"{base:.1}\" y2=\"{base:.1}\" stroke=\"{AXIS}\"/>\n\
             <line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{base:.1}\" stroke=\"{AXIS}\"/>\n</svg>\n"
        );
        self.out.into_bytes()
    }
}

/// Tick values at a step of 1, 2 or 5 times a power of ten, the smallest
/// such step that puts at most 8 across `lo..=hi` (at least 1 for counts),
/// and the decimals that print the step.
fn ticks(lo: f64, hi: f64, counts: bool) -> (Vec<f64>, usize) {
    let raw = (hi - lo) / 8.0;
    let (mut magnitude, mut decimals) = (1.0f64, 0usize);
    while magnitude * 10.0 <= raw {
        magnitude *= 10.0;
    }
    while magnitude > raw && decimals < 12 {
        magnitude /= 10.0;
        decimals += 1;
    }
    let mut steps = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0].iter().enumerate().map(|(i, m)| (i, m * magnitude));
    let fits = |step: f64| (hi / step).floor() - (lo / step).ceil() + 1.0 <= 8.0 && (!counts || step >= 1.0);
    let (i, step) = steps.find(|(_, s)| fits(*s)).unwrap_or((6, 100.0 * magnitude));
    let decimals = decimals.saturating_sub(i / 3);
    let first = (lo / step).ceil();
    let values = (0..)
        .map(|k| (first + k as f64) * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .map(|v| if v.abs() < step * 1e-9 { 0.0 } else { v })
        .collect();
    (values, if counts { 0 } else { decimals })
}

/// Overlaid histograms of `series` over their common range, `BINS` bins,
/// each series named with its count in the legend. Non-finite values are
/// left out.
pub fn histogram(labels: &Labels, series: &[Series]) -> Histogram {
    let finite = || series.iter().flat_map(|s| s.values.iter().copied().filter(|v| v.is_finite()));
    let (mut lo, mut hi) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    } else if lo == hi {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let width = (hi - lo) / BINS as f64;
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|s| {
            let mut c = vec![0; BINS];
            for v in s.values.iter().filter(|v| v.is_finite()) {
                c[(((v - lo) / (hi - lo) * BINS as f64) as usize).min(BINS - 1)] += 1;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
    // Headroom above the tallest bar for the legend.
    let y_top = (top as f64 * 1.25).ceil().max(2.0);
    let mut chart = Chart::new(labels, (lo, hi), (0.0, y_top), true);
    chart.y_ticks();
    for (s, c) in series.iter().zip(&counts) {
        for (bin, &n) in c.iter().enumerate().filter(|(_, n)| **n > 0) {
            let x0 = lo + bin as f64 * width;
            chart.rect((x0, x0 + width), (0.0, n as f64), s.color, "0.55");
        }
    }
    chart.x_ticks();
    let entries: Vec<(String, &str)> = series
        .iter()
        .zip(&counts)
        .map(|(s, c)| (format!("{} (n = {})", s.label, c.iter().sum::<usize>()), s.color))
        .collect();
    chart.legend(&entries);
    Histogram { svg: chart.finish(), range: (lo, hi) }
}

/// One bar per category, from zero, each with its value above it.
pub fn bars(labels: &Labels, categories: &[String], values: &[f64], color: &'static str) -> Vec<u8> {
    let top = values.iter().copied().filter(|v| v.is_finite()).fold(0.0, f64::max);
    let n = categories.len().max(1) as f64;
    let mut chart = Chart::new(labels, (0.0, n), (0.0, if top > 0.0 { top * 1.15 } else { 1.0 }), false);
    chart.y_ticks();
    for (i, (category, v)) in categories.iter().zip(values).enumerate() {
        let v = if v.is_finite() { *v } else { 0.0 };
        chart.rect((i as f64 + 0.2, i as f64 + 0.8), (0.0, v), color, "0.8");
        let (x, y) = (chart.px(i as f64 + 0.5), chart.py(v) - 4.0);
        chart.out += &format!("<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\">{v:.1}</text>\n");
        chart.x_tick(x, category);
    }
    chart.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS: Labels = Labels { title: "Scores <train>", x: "score", y: "responses" };

    fn text(svg: &[u8]) -> String {
        String::from_utf8(svg.to_vec()).unwrap()
    }

    /// Rectangles of one colour, as (x, height).
    fn bars_of(svg: &str, color: &str) -> Vec<(f64, f64)> {
        let attr = |line: &str, name: &str| -> f64 {
            let at = line.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            line[at..].split('"').next().unwrap().parse().unwrap()
        };
        svg.lines()
            .filter(|l| {
                l.starts_with("<rect x=") && l.contains(&format!("fill=\"{color}\"")) && !l.contains("width=\"12\"")
            })
            .map(|l| (attr(l, "x"), attr(l, "height")))
            .collect()
    }

    #[test]
    fn a_histogram_has_its_title_axes_ticks_and_legend() {
        let (a, b) = ([1.0, 2.0, 2.0, 3.0], [2.0, 4.0, f64::NAN]);
        let h = histogram(
            &LABELS,
            &[
                Series { label: "chosen", values: &a, color: CHOSEN },
                Series { label: "rejected", values: &b, color: REJECTED },
            ],
        );
        assert_eq!(h.range, (1.0, 4.0));
        let svg = text(&h.svg);
        assert!(svg.contains("<title>Scores &lt;train&gt;</title>"), "the title, escaped");
        assert!(svg.contains(">score</text>") && svg.contains(">responses</text>"), "axis labels");
        assert!(svg.contains(">chosen (n = 4)</text>") && svg.contains(">rejected (n = 2)</text>"), "the legend");
        for tick in ["1.0", "2.0", "3.0", "4.0"] {
            assert!(svg.contains(&format!(">{tick}</text>")), "x tick {tick}:\n{svg}");
        }
        // Counts: chosen has two values at 2.0, so its tallest bar is twice its others.
        let heights: Vec<f64> = bars_of(&svg, CHOSEN).iter().map(|b| b.1).collect();
        assert_eq!(heights.len(), 3);
        let (max, min) = heights.iter().fold((0f64, f64::MAX), |(a, b), h| (a.max(*h), b.min(*h)));
        assert!((max / min - 2.0).abs() < 0.02, "{heights:?}");
        assert_eq!(bars_of(&svg, REJECTED).len(), 2, "NaN is left out");
        assert_eq!(
            h.svg,
            histogram(
                &LABELS,
                &[
                    Series { label: "chosen", values: &a, color: CHOSEN },
                    Series { label: "rejected", values: &b, color: REJECTED }
                ]
            )
            .svg
        );
    }

    #[test]
    fn bars_scale_to_the_largest_value_and_name_their_categories() {
        let svg = text(&bars(&LABELS, &["13".into(), "21".into()], &[1.0, 2.0], CHOSEN));
        let b = bars_of(&svg, CHOSEN);
        assert_eq!(b.len(), 2);
        assert!((b[0].1 / b[1].1 - 0.5).abs() < 0.01, "{b:?}");
        assert!(svg.contains(">13</text>") && svg.contains(">21</text>") && svg.contains(">2.0</text>"));
    }

    #[test]
    fn ticks_are_round_numbers_across_the_range() {
        let shown = |lo, hi, counts| -> String {
            let (t, d) = ticks(lo, hi, counts);
            t.iter().map(|v| format!("{v:.d$}")).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(shown(0.0, 10.0, false), "0 2 4 6 8 10");
        assert_eq!(shown(-0.33, 0.41, false), "-0.3 -0.2 -0.1 0.0 0.1 0.2 0.3 0.4");
        assert_eq!(shown(120.0, 1480.0, false), "200 400 600 800 1000 1200 1400");
        assert_eq!(shown(0.0012, 0.0049, false), "0.0015 0.0020 0.0025 0.0030 0.0035 0.0040 0.0045");
        assert_eq!(shown(0.0, 2.0, true), "0 1 2", "counts tick by whole numbers");
    }
}
