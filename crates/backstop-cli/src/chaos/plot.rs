//! The picture of a `backstop chaos` run: effects per second and confirmed
//! orders per second over time, with a marker and a label at every fault
//! (a solid line at its start, a dashed one where its recovery step ended).
//! An SVG, drawn with `plotters`' SVG backend alone.

use super::schedule::Struck;
use plotters::prelude::*;
use std::path::Path;

/// Counts per whole second from `start_ms` to `end_ms`.
fn per_second(times: impl Iterator<Item = i64>, start_ms: i64, end_ms: i64) -> Vec<(f64, f64)> {
    let seconds = ((end_ms - start_ms).max(0) / 1000 + 1) as usize;
    let mut counts = vec![0u32; seconds];
    for at in times {
        let second = (at - start_ms).div_euclid(1000);
        if let Some(count) = usize::try_from(second).ok().and_then(|s| counts.get_mut(s)) {
            *count += 1;
        }
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(s, n)| (s as f64, f64::from(n)))
        .collect()
}

/// Writes the picture to `path`.
pub(crate) fn draw(
    path: &Path,
    title: &str,
    effects: &[i64],
    confirmed: &[i64],
    faults: &[Struck],
    start_ms: i64,
    end_ms: i64,
) -> Result<(), String> {
    let effects = per_second(effects.iter().copied(), start_ms, end_ms);
    let confirmed = per_second(confirmed.iter().copied(), start_ms, end_ms);
    let x_max = effects.len().max(1) as f64;
    let peak = effects
        .iter()
        .chain(&confirmed)
        .map(|(_, n)| *n)
        .fold(1.0, f64::max);
    let y_max = peak * 1.35;
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("per second")
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| fail(&e))?;
    let effect_colour = RGBColor(31, 119, 180);
    let confirm_colour = RGBColor(150, 150, 150);
    chart
        .draw_series(LineSeries::new(confirmed, confirm_colour.stroke_width(1)))
        .map_err(|e| fail(&e))?
        .label("orders confirmed by the broker / s")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], confirm_colour));
    chart
        .draw_series(LineSeries::new(effects, effect_colour.stroke_width(2)))
        .map_err(|e| fail(&e))?
        .label("effects recorded in PostgreSQL / s")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], effect_colour));
    let fault_colour = RGBColor(214, 39, 40);
    for (i, fault) in faults.iter().enumerate() {
        let at = (fault.start_ms - start_ms) as f64 / 1000.0;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(at, 0.0), (at, y_max)],
                fault_colour.stroke_width(1),
            )))
            .map_err(|e| fail(&e))?;
        if let Some(recovered) = fault.recovered_ms {
            let x = (recovered - start_ms) as f64 / 1000.0;
            let mut y = 0.0;
            let step = y_max / 60.0;
            while y < y_max {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x, y), (x, (y + step / 2.0).min(y_max))],
                        fault_colour.mix(0.6).stroke_width(1),
                    )))
                    .map_err(|e| fail(&e))?;
                y += step;
            }
        }
        // Labels take turns between three heights so neighbours do not overlap.
        let height = y_max * (0.97 - 0.045 * (i % 3) as f64);
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{} {}", i + 1, fault.kind),
                (at, height),
                ("sans-serif", 12).into_font().color(&fault_colour),
            )))
            .map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fall_into_their_second() {
        let series = per_second([1_000, 1_999, 2_000, 500, 9_000].into_iter(), 1_000, 3_500);
        assert_eq!(series, vec![(0.0, 2.0), (1.0, 1.0), (2.0, 0.0)]);
    }
}
