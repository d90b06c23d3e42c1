//! PNG pictures of a chaos run: a latency scatter (one colour per operation outcome, log-scale
//! milliseconds) and a throughput chart (completed operations per one-second bucket), both with
//! the fault windows shaded and labelled. Text uses the embedded DejaVu Sans font, so no system
//! fonts are needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// One completed operation, placed on the time axis.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the run started, at the operation's completion.
    pub time_s: f64,
    /// Completion minus invocation, in milliseconds.
    pub latency_ms: f64,
    pub series: Series,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Series {
    TransferOk,
    TransferFailed,
    TransferUnknown,
    ReadOk,
    ReadUnknown,
}

const ALL_SERIES: [Series; 5] = [
    Series::TransferOk,
    Series::TransferFailed,
    Series::TransferUnknown,
    Series::ReadOk,
    Series::ReadUnknown,
];

impl Series {
    pub fn label(self) -> &'static str {
        match self {
            Series::TransferOk => "transfer ok",
            Series::TransferFailed => "transfer failed (definite)",
            Series::TransferUnknown => "transfer unknown",
            Series::ReadOk => "read ok",
            Series::ReadUnknown => "read unknown/failed",
        }
    }

    fn color(self) -> RGBColor {
        match self {
            Series::TransferOk => RGBColor(0, 140, 60),
            Series::TransferFailed => RGBColor(210, 30, 30),
            Series::TransferUnknown => RGBColor(240, 140, 0),
            Series::ReadOk => RGBColor(30, 90, 210),
            Series::ReadUnknown => RGBColor(150, 60, 180),
        }
    }
}

/// A fault window, shaded on both pictures.
#[derive(Debug, Clone)]
pub struct Window {
    pub start_s: f64,
    pub end_s: f64,
    pub label: String,
}

const SIZE: (u32, u32) = (1400, 700);
const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const MIN_LATENCY_MS: f64 = 0.1;

type Chart<'a, 'b, Y> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// Registers the embedded font for `FONT` once; later calls return the first outcome.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT, FontStyle::Normal, FONT_BYTES)
                .map_err(|_| "embedded font DejaVuSans.ttf is not a valid font".to_string())
        })
        .clone()
}

/// Right end of the x axis: `end_s`, or 1 s when it is zero, negative or not finite.
fn x_end(end_s: f64) -> f64 {
    if end_s.is_finite() && end_s > 0.0 { end_s } else { 1.0 }
}

/// Prefixes a plotting error with the output path.
fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("plotting {}: {e}", path.display())
}

/// Formats an axis tick without float noise (0.1, 0.5, 2, 300).
fn fmt_tick(v: &f64) -> String {
    if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}").trim_end_matches(".0").to_string() }
}

/// Fills the picture white and sets up a chart titled `title` over x in `0..x1` and the given y range.
fn build<'a, 'b, Y: AsRangedCoord<Value = f64>>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    x1: f64,
    y: Y,
    path: &Path,
) -> Result<Chart<'a, 'b, Y::CoordDescType>, String> {
    root.fill(&WHITE).map_err(err(path))?;
    ChartBuilder::on(root)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x1, y)
        .map_err(err(path))
}

/// Draws the axes and the shaded fault windows, each labelled at its top left corner.
fn draw_frame<Y>(
    chart: &mut Chart<'_, '_, Y>,
    windows: &[Window],
    y_desc: &str,
    path: &Path,
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc(y_desc)
        .x_label_formatter(&fmt_tick)
        .y_label_formatter(&fmt_tick)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err(path))?;

    let (x0, x1) = (chart.x_range().start, chart.x_range().end);
    let (y0, y1) = (chart.y_range().start, chart.y_range().end);
    let clamp = |v: f64| if v.is_finite() { v.clamp(x0, x1) } else { x0 };
    let shade = RGBColor(200, 60, 60).mix(0.15);
    let edge = RGBColor(200, 60, 60).mix(0.6);
    for (i, w) in windows.iter().enumerate() {
        let (a, b) = (clamp(w.start_s.min(w.end_s)), clamp(w.start_s.max(w.end_s)));
        let rect = Rectangle::new([(a, y0), (b, y1)], shade.filled());
        let left = PathElement::new(vec![(a, y0), (a, y1)], edge);
        chart.draw_series([rect]).map_err(err(path))?;
        chart.draw_series([left]).map_err(err(path))?;
        // Stagger labels over three rows so neighbouring windows stay legible.
        let offset = (4, 4 + 15 * (i as i32 % 3));
        let text = Text::new(w.label.clone(), offset, (FONT, 12).into_font().color(&BLACK));
        chart.draw_series([EmptyElement::at((a, y1)) + text]).map_err(err(path))?;
    }
    Ok(())
}

/// Draws the legend box in the lower right corner.
fn draw_legend<'a, 'b: 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<'a, 'b, Y>,
    path: &Path,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(err(path))
}

/// Latency over time: a scatter of every sample (log-scale y axis in ms, from 0.1 ms to the max seen),
/// one colour per series with a legend, fault windows shaded (translucent) with their label written
/// at the top of each window, x axis "seconds since start" from 0 to `end_s`.
pub fn latency_png(path: &Path, samples: &[Sample], windows: &[Window], end_s: f64) -> Result<(), String> {
    ensure_font().map_err(err(path))?;
    let x1 = x_end(end_s);
    // Samples outside 0..end_s (or with a non-finite latency) are left out.
    let visible: Vec<&Sample> =
        samples.iter().filter(|s| (0.0..=x1).contains(&s.time_s) && s.latency_ms.is_finite()).collect();
    let max_ms = visible.iter().map(|s| s.latency_ms).fold(1.0, f64::max);
    // Head room above the slowest sample leaves space for the window labels.
    let y_range = (MIN_LATENCY_MS..max_ms * 4.0).log_scale();

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let mut chart = build(&root, "latency by operation", x1, y_range, path)?;
    draw_frame(&mut chart, windows, "latency (ms, log scale)", path)?;

    for series in ALL_SERIES {
        let color = series.color();
        let points = visible
            .iter()
            .filter(|s| s.series == series)
            .map(|s| (s.time_s, s.latency_ms.max(MIN_LATENCY_MS)));
        let dot = color.mix(0.7).filled();
        chart
            .draw_series(points.map(|p| Circle::new(p, 2, dot)))
            .map_err(err(path))?
            .label(series.label())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    draw_legend(&mut chart, path)?;
    root.present().map_err(err(path))
}

/// Per-second counts of the samples in the `keep` series, as (bucket centre, count) points.
fn buckets(samples: &[Sample], x1: f64, keep: &[Series]) -> Vec<(f64, f64)> {
    let n = x1.ceil().max(1.0) as usize;
    let mut counts = vec![0u32; n];
    for s in samples.iter().filter(|s| keep.contains(&s.series) && (0.0..=x1).contains(&s.time_s)) {
        counts[(s.time_s as usize).min(n - 1)] += 1;
    }
    counts.into_iter().enumerate().map(|(i, c)| ((i as f64 + 0.5).min(x1), f64::from(c))).collect()
}

/// Throughput over time: successful operations per second (1-second buckets), one line for
/// TransferOk and one for ReadOk (and a line for TransferUnknown+ReadUnknown "unknown outcomes"),
/// same shading and labels, x axis 0..end_s.
pub fn throughput_png(path: &Path, samples: &[Sample], windows: &[Window], end_s: f64) -> Result<(), String> {
    ensure_font().map_err(err(path))?;
    let x1 = x_end(end_s);
    let unknown = [Series::TransferUnknown, Series::ReadUnknown];
    let lines = [
        ("transfer ok", Series::TransferOk.color(), buckets(samples, x1, &[Series::TransferOk])),
        ("read ok", Series::ReadOk.color(), buckets(samples, x1, &[Series::ReadOk])),
        ("unknown outcomes", Series::TransferUnknown.color(), buckets(samples, x1, &unknown)),
    ];
    let max = lines.iter().flat_map(|l| l.2.iter().map(|p| p.1)).fold(1.0, f64::max);

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let mut chart = build(&root, "throughput (operations completed per second)", x1, 0.0..max * 1.2, path)?;
    draw_frame(&mut chart, windows, "operations per second", path)?;

    for (label, color, points) in lines {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err(path))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    draw_legend(&mut chart, path)?;
    root.present().map_err(err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws both pictures into a fresh temporary directory and checks they are PNG files.
    fn draw_both(samples: &[Sample], windows: &[Window], end_s: f64) {
        let dir = tempfile::tempdir().unwrap();
        let (lat, thr) = (dir.path().join("latency.png"), dir.path().join("throughput.png"));
        latency_png(&lat, samples, windows, end_s).unwrap();
        throughput_png(&thr, samples, windows, end_s).unwrap();
        for path in [lat, thr] {
            assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"), "{}", path.display());
        }
    }

    #[test]
    fn draws_both_pictures() {
        let samples: Vec<Sample> = (0..600)
            .map(|i| Sample {
                time_s: f64::from(i) * 0.05,
                latency_ms: 0.05 + f64::from(i % 37) * f64::from(1 + i % 5),
                series: ALL_SERIES[i as usize % 5],
            })
            .collect();
        let window = |start_s, end_s, label: &str| Window { start_s, end_s, label: label.to_string() };
        let windows = [
            window(5.0, 12.0, "partition {n1} | {n2 n3}"),
            window(9.0, 15.0, "kill n2"),
            window(20.0, 20.0, "zero-length"),
        ];
        draw_both(&samples, &windows, 30.0);
    }

    #[test]
    fn empty_inputs_and_zero_end() {
        draw_both(&[], &[], 0.0);
    }
}
