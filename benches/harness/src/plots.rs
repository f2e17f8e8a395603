//! SVG plots of a scenario's results, one line per strategy: admitted per window against the
//! limit over time, and the latency CDF.
//!
//! plotters' SVG backend only, without its font stack: text is laid out with plotters' built-in
//! estimate and drawn as SVG `<text>` by whatever shows the file, so building needs neither
//! fontconfig nor freetype.

use std::path::Path;

use plotters::prelude::*;

/// The colour of event marks (strategies take Palette99's).
const EVENT: RGBColor = RGBColor(90, 90, 90);

/// One strategy's line.
#[derive(Debug, Clone)]
pub struct Line {
    /// The legend.
    pub label: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// Drawing a plot failed.
#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {why}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// plotters' error.
    pub why: String,
}

/// Admitted per window (key 0, the hottest) for each strategy, against the limit, with a
/// vertical mark at each event.
pub fn admitted(
    path: &Path,
    title: &str,
    limit: u64,
    lines: &[Line],
    events: &[(f64, String)],
) -> Result<(), PlotError> {
    let err = |e: String| PlotError {
        path: path.display().to_string(),
        why: e,
    };
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        + 1.0;
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(limit as f64, f64::max)
        * 1.15;
    draw(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds from the load's start (window start)")
            .y_desc("admitted per window, key 0")
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, limit as f64), (x_max, limit as f64)],
                BLACK.stroke_width(2),
            ))?
            .label(format!("limit ({limit})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        for (at, what) in events {
            chart
                .draw_series(LineSeries::new(
                    [(*at, 0.0), (*at, y_max)],
                    EVENT.stroke_width(2),
                ))?
                .label(format!("{what} at {at:.1} s"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], EVENT.stroke_width(2)));
        }
        strategy_lines(&mut chart, lines, |p| p)
    })
    .map_err(err)
}

/// The latency CDF (x: µs, log scale; y: fraction of calls at or below) per strategy.
pub fn latency_cdf(path: &Path, title: &str, lines: &[Line]) -> Result<(), PlotError> {
    let err = |e: String| PlotError {
        path: path.display().to_string(),
        why: e,
    };
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(10.0, f64::max)
        * 1.5;
    draw(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..1.0)?;
        chart
            .configure_mesh()
            .x_desc("latency from the intended send time, µs (log)")
            .y_desc("fraction of decided calls")
            .draw()?;
        // A log axis has no 0: a sub-µs latency is drawn at 1 µs.
        strategy_lines(&mut chart, lines, |(x, y)| (x.max(1.0), y))
    })
    .map_err(err)
}

/// Draws one line per strategy (Palette99 colours, in order) through `point`, then the legend
/// of every series on the chart.
fn strategy_lines<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    lines: &[Line],
    point: impl Fn((f64, f64)) -> (f64, f64),
) -> Result<(), DrawingAreaErrorKind<std::io::Error>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, line) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                line.points.iter().map(|&p| point(p)),
                color.stroke_width(2),
            ))?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Opens `path` as a 960 × 480 SVG, runs `body` on it and writes the file.
fn draw(
    path: &Path,
    body: impl FnOnce(&Area<'_>) -> Result<(), DrawingAreaErrorKind<std::io::Error>>,
) -> Result<(), String> {
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    body(&root).map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_plots_are_written_with_every_label() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            Line {
                label: "standalone".into(),
                points: vec![(0.0, 100.0), (1.0, 100.0), (2.0, 99.0)],
            },
            Line {
                label: "gossip-3".into(),
                points: vec![(0.0, 110.0), (1.0, 101.0), (2.0, 100.0)],
            },
        ];
        let a = dir.path().join("a.svg");
        admitted(&a, "t", 100, &lines, &[(1.5, "pause node 1".into())]).unwrap();
        let svg = std::fs::read_to_string(&a).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        for label in [
            "standalone",
            "gossip-3",
            "limit (100)",
            "pause node 1 at 1.5 s",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        let c = dir.path().join("c.svg");
        let cdf = vec![Line {
            label: "redis".into(),
            points: vec![(100.0, 0.5), (300.0, 0.99), (900.0, 1.0)],
        }];
        latency_cdf(&c, "t", &cdf).unwrap();
        assert!(std::fs::read_to_string(&c).unwrap().contains("redis"));
    }
}
