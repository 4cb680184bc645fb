//! A line chart as standalone SVG: validation accuracy per epoch, one line per model.

/// One line: a name, a colour and `(x, y)` points, with an error bar of ± `errors[i]` at
/// point i when `errors` is not empty.
pub struct Series {
    pub name: String,
    pub colour: &'static str,
    pub points: Vec<(f64, f64)>,
    pub errors: Vec<f64>,
}

pub const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// Renders `series` with axes, ticks and a legend. `y` values are fractions, shown as percent.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    chart(title, x_label, y_label, series, false)
}

/// [`line_chart`] with a logarithmic x axis (counts spanning decades), ticked at the data's x.
pub fn log_x_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let logged: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            colour: s.colour,
            points: s.points.iter().map(|&(x, y)| (x.log10(), y)).collect(),
            errors: s.errors.clone(),
        })
        .collect();
    chart(title, x_label, y_label, &logged, true)
}

/// The canvas: size, margins, and the data's ranges mapped onto it.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    x_min: f64,
    x_span: f64,
    y_min: f64,
    y_max: f64,
}

impl Frame {
    /// The frame around every point of `series`, its error bars included: whole percentage points
    /// around the data, at least 2 points tall.
    fn around(series: &[Series], log_x: bool) -> (Self, Vec<f64>) {
        let all: Vec<(f64, f64)> = series
            .iter()
            .flat_map(|s| {
                let e = |i: usize| s.errors.get(i).copied().unwrap_or(0.0);
                s.points
                    .iter()
                    .enumerate()
                    .flat_map(move |(i, &(x, y))| [(x, y - e(i)), (x, y + e(i))])
            })
            .collect();
        let floor = if log_x { f64::NEG_INFINITY } else { 1.0 };
        let x_max = all.iter().map(|p| p.0).fold(floor, f64::max);
        let x_min = all
            .iter()
            .map(|p| p.0)
            .fold(f64::INFINITY, f64::min)
            .min(x_max);
        let (mut y_min, mut y_max) = all
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
        if !y_min.is_finite() {
            (y_min, y_max) = (0.0, 1.0);
        }
        y_min = ((y_min * 100.0).floor() - 1.0).max(0.0) / 100.0;
        y_max = ((y_max * 100.0).ceil() + 1.0).min(100.0) / 100.0;
        if y_max - y_min < 0.02 {
            y_max = (y_min + 0.02).min(1.0);
        }
        let x_span = (x_max - x_min).max(if log_x { 1e-9 } else { 1.0 });
        let frame = Self {
            w: 720.0,
            h: 420.0,
            left: 70.0,
            right: 180.0,
            top: 40.0,
            bottom: 50.0,
            x_min,
            x_span,
            y_min,
            y_max,
        };
        // Ticks at the data's own x values when there are few of them (a sweep's temperatures,
        // label counts), else at whole numbers (epochs).
        let mut xs: Vec<f64> = all.iter().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        if xs.len() > 12 {
            let step = (x_max / 10.0).ceil().max(1.0) as usize;
            xs = (1..=x_max as usize)
                .step_by(step)
                .map(|x| x as f64)
                .collect();
        }
        (frame, xs)
    }

    fn px(&self, x: f64) -> f64 {
        self.left + (x - self.x_min) / self.x_span * (self.w - self.left - self.right)
    }

    fn py(&self, y: f64) -> f64 {
        self.top + (self.y_max - y) / (self.y_max - self.y_min) * (self.h - self.top - self.bottom)
    }

    /// The title, the y grid and its labels, the x ticks, the axes and their labels.
    fn axes(&self, title: &str, x_label: &str, y_label: &str, xs: &[f64], log_x: bool) -> String {
        let (w, h, left, right, top, bottom) =
            (self.w, self.h, self.left, self.right, self.top, self.bottom);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>\n",
            (left + w - right) / 2.0,
            escape(title)
        );
        for i in 0..=5 {
            let y = self.y_min + (self.y_max - self.y_min) * i as f64 / 5.0;
            svg += &format!(
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.1}%</text>\n",
                w - right,
                left - 6.0,
                self.py(y) + 4.0,
                100.0 * y,
                py = self.py(y)
            );
        }
        for &x in xs {
            let shown = if log_x {
                crate::group(10f64.powf(x).round() as usize)
            } else {
                x.to_string()
            };
            svg += &format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{shown}</text>\n",
                self.px(x),
                h - bottom + 18.0
            );
        }
        svg + &format!(
            "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{left}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text transform=\"translate(18 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
            h - bottom,
            w - right,
            h - bottom,
            h - bottom,
            (left + w - right) / 2.0,
            h - 12.0,
            escape(x_label),
            (top + h - bottom) / 2.0,
            escape(y_label)
        )
    }

    /// One series: its line, its points with their error bars, and its legend entry (row `i`).
    fn series(&self, i: usize, s: &Series) -> String {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y)))
            .collect();
        let mut svg = format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
            s.colour,
            pts.join(" ")
        );
        for (j, &(x, y)) in s.points.iter().enumerate() {
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>\n",
                self.px(x),
                self.py(y),
                s.colour
            );
            if let Some(&e) = s.errors.get(j).filter(|e| **e > 0.0) {
                svg += &format!(
                    "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\"/>\n",
                    self.py(y - e),
                    self.py(y + e),
                    s.colour,
                    x = self.px(x)
                );
            }
        }
        let (ly, lx) = (self.top + 20.0 * i as f64 + 10.0, self.w - self.right);
        svg + &format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            lx + 15.0,
            lx + 40.0,
            s.colour,
            lx + 46.0,
            ly + 4.0,
            escape(&s.name)
        )
    }
}

fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series], log_x: bool) -> String {
    let (frame, xs) = Frame::around(series, log_x);
    let mut svg = frame.axes(title, x_label, y_label, &xs, log_x);
    for (i, s) in series.iter().enumerate() {
        svg += &frame.series(i, s);
    }
    svg + "</svg>\n"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_one_line_per_series_and_escapes_names() {
        let s = |name: &str, c| Series {
            name: name.into(),
            colour: c,
            points: vec![(1.0, 0.8), (2.0, 0.85), (3.0, 0.9)],
            errors: vec![],
        };
        let svg = line_chart(
            "t",
            "epoch",
            "acc",
            &[s("a<b", COLOURS[0]), s("c", COLOURS[1])],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b") && svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        // A single-epoch series still renders (no division by zero).
        let one = line_chart(
            "t",
            "x",
            "y",
            &[Series {
                name: "x".into(),
                colour: COLOURS[2],
                points: vec![(1.0, 0.5)],
                errors: vec![],
            }],
        );
        assert!(!one.contains("NaN") && !one.contains("inf"));
        // A log-scale axis ticked at the data's counts, with error bars.
        let log = log_x_chart(
            "t",
            "labels",
            "acc",
            &[Series {
                name: "b".into(),
                colour: COLOURS[0],
                points: vec![(1000.0, 0.8), (5000.0, 0.85), (55000.0, 0.9)],
                errors: vec![0.01, 0.0, 0.02],
            }],
        );
        assert!(log.contains(">1,000<") && log.contains(">55,000<"), "{log}");
        assert_eq!(
            log.matches("<line x1").count() - one.matches("<line x1").count(),
            2
        );
        assert!(!log.contains("NaN"));
    }
}
