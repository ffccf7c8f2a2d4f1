//! SVG plots of the scenario tables (plotters, SVG backend: no fonts or native
//! libraries needed): grouped bar charts, one group per measurement, one bar per system.

use std::path::Path;

use plotters::prelude::*;

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// A grouped bar chart: `groups` along x, one bar per series in each group (missing
/// values leave a gap).
pub fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0f64, |a, b| a.max(*b));
    if groups.is_empty() || series.is_empty() || max <= 0.0 {
        anyhow::bail!("nothing to plot for {title}");
    }
    let width = (220 * groups.len() as u32).max(640);
    let root = SVGBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = groups.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..max * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 && i < groups.len() {
                groups[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()?;
    let k = series.len() as f64;
    let bar = 0.8 / k;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().filter_map(|(gi, v)| {
                v.map(|v| {
                    let x0 = gi as f64 + 0.1 + bar * si as f64;
                    Rectangle::new([(x0, 0.0), (x0 + bar * 0.9, v)], color.filled())
                })
            }))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Plots rows of a scenario table (`[{"metric": m, system: {"median": v}}]`): one group per
/// metric in `metrics` (shown as its label), one bar per system.
pub fn table(
    path: &Path,
    title: &str,
    y_desc: &str,
    table: &serde_json::Value,
    metrics: &[(&str, &str)],
    systems: &[String],
) -> anyhow::Result<()> {
    let rows = table.as_array().cloned().unwrap_or_default();
    let groups: Vec<String> = metrics.iter().map(|(_, l)| l.to_string()).collect();
    let series: Vec<(String, Vec<Option<f64>>)> = systems
        .iter()
        .map(|s| {
            let v = metrics
                .iter()
                .map(|(m, _)| {
                    rows.iter()
                        .find(|r| r["metric"] == *m)
                        .and_then(|r| r[s.as_str()]["median"].as_f64())
                })
                .collect();
            (s.clone(), v)
        })
        .filter(|(_, v): &(String, Vec<Option<f64>>)| v.iter().any(|x| x.is_some()))
        .collect();
    bars(path, title, y_desc, &groups, &series)
}
