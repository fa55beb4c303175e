//! The plot: time to the last EOF against N, node and floor, on log axes.

use std::path::Path;

use plotters::prelude::*;

use crate::shutdown::Point;

pub fn draw(points: &[Point], path: &Path) -> Result<(), String> {
    if points.is_empty() {
        return Ok(());
    }
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let node: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.neighbors as f64, p.eof_ms.median.max(0.01)))
        .collect();
    let floor: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.neighbors as f64, p.floor_eof_ms.median.max(0.01)))
        .collect();
    let plain: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.neighbors as f64, p.plain_floor_eof_ms.median.max(0.01)))
        .collect();
    let xs = node.iter().map(|p| p.0);
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let ys = node.iter().chain(&floor).chain(&plain).map(|p| p.1);
    let (y_min, y_max) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));

    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "shutdown: time to the last neighbor's EOF",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (x_min * 0.8..x_max * 1.25).log_scale(),
            (y_min * 0.5..y_max * 2.0).log_scale(),
        )
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("neighbors (N)")
        .y_desc("ms")
        .draw()
        .map_err(|e| err(&e))?;
    let series = [
        (&node, RED, "meshnode"),
        (&floor, BLUE, "floor (encrypted links)"),
        (&plain, GREEN, "plaintext floor"),
    ];
    for (series, color, name) in series {
        chart
            .draw_series(LineSeries::new(
                series.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(series.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
