//! The PNG bar chart of a run: per image, the median time to ready of each mode, on a log
//! scale (a full pull of `bigdata` and a lazy start of `python` differ by two orders).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// DejaVu Sans from Debian's fonts-dejavu-core: plotters' ab_glyph text needs a font file.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const COLOURS: [RGBColor; 5] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 120, 40),
    RGBColor(40, 110, 190),
    RGBColor(40, 160, 90),
    RGBColor(150, 80, 170),
];

/// Draws `medians` (image -> mode -> seconds, modes in `modes` order) into `path`.
pub fn draw(
    path: &Path,
    title: &str,
    modes: &[String],
    medians: &BTreeMap<String, BTreeMap<String, f64>>,
) -> Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (package fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can use"))?;
    let images: Vec<&String> = medians.keys().collect();
    let highest = medians
        .values()
        .flat_map(|m| m.values())
        .fold(1.0f64, |a, &b| a.max(b));
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(
            0f64..images.len() as f64,
            (0.05f64..highest * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(images.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let slot = x - x.floor();
            match images.get(x.floor() as usize) {
                Some(image) if (slot - 0.5).abs() < 0.01 => image.to_string(),
                _ => String::new(),
            }
        })
        .y_label_formatter(&|v| format!("{}", (v * 100.0).round() / 100.0))
        .light_line_style(WHITE)
        .y_desc("seconds to ready (median, log scale)")
        .label_style(("sans-serif", 15))
        .draw()?;
    let width = 0.8 / modes.len() as f64;
    for (m, mode) in modes.iter().enumerate() {
        let colour = COLOURS[m % COLOURS.len()];
        let bars = images.iter().enumerate().filter_map(|(i, image)| {
            let seconds = *medians[*image].get(mode)?;
            let left = i as f64 + 0.1 + m as f64 * width;
            Some(Rectangle::new(
                [(left, 0.05), (left + width * 0.9, seconds)],
                colour.filled(),
            ))
        });
        chart
            .draw_series(bars)?
            .label(mode.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
