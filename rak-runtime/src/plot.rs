//! Loss curves of runs drawn to PNG with plotters: the training loss of each run (a line) and
//! its validation losses (points), read from the runs' `metrics.jsonl`.
//!
//! Text is drawn with a TrueType font found on the system (DejaVu Sans on Debian:
//! `fonts-dejavu-core`); `RAK_PLOT_FONT` names another file.

use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One run's curves: `(step, loss)` of training and of validation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    pub name: String,
    pub train: Vec<(f64, f64)>,
    pub validation: Vec<(f64, f64)>,
}

/// Reads the curves of a run directory. A run resumed after an interruption logs some steps
/// twice; the later value wins.
pub fn read_curves(run_dir: &Path) -> Result<Curves, String> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut train = std::collections::BTreeMap::new();
    let mut validation = std::collections::BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: {e}", path.display(), number + 1))?;
        let (Some(phase), Some(step), Some(loss)) = (
            value["phase"].as_str(),
            value["step"].as_u64(),
            value["loss"].as_f64(),
        ) else {
            continue;
        };
        match phase {
            "train" => train.insert(step, loss),
            "validation" => validation.insert(step, loss),
            _ => None,
        };
    }
    let points = |map: std::collections::BTreeMap<u64, f64>| {
        map.into_iter().map(|(s, l)| (s as f64, l)).collect()
    };
    Ok(Curves {
        name: run_dir.file_name().map_or_else(
            || run_dir.display().to_string(),
            |n| n.to_string_lossy().into(),
        ),
        train: points(train),
        validation: points(validation),
    })
}

/// A TrueType font for the plot's text.
fn find_font() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("RAK_PLOT_FONT") {
        return Ok(PathBuf::from(path));
    }
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/Library/Fonts/Arial.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
        "C:\\Windows\\Fonts\\arial.ttf",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "no TrueType font found for the plot's text: install DejaVu Sans \
             (`apt-get install fonts-dejavu-core`) or set RAK_PLOT_FONT to a .ttf file"
                .to_string()
        })
}

fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = find_font()?;
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("cannot read the font `{}`: {e}", path.display()))?;
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("`{}` is not a TrueType font", path.display()))
        })
        .clone()
}

/// Draws the loss curves of `runs` into the PNG file `out` (1024×640).
pub fn loss_curves(runs: &[PathBuf], out: &Path) -> Result<(), String> {
    let curves = runs
        .iter()
        .map(|run| read_curves(run))
        .collect::<Result<Vec<_>, _>>()?;
    draw(&curves, out)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Draws `curves` into the PNG file `out`.
pub fn draw(curves: &[Curves], out: &Path) -> Result<(), String> {
    register_font()?;
    let points = || {
        curves
            .iter()
            .flat_map(|c| c.train.iter().chain(&c.validation))
            .filter(|(_, loss)| loss.is_finite())
    };
    if points().next().is_none() {
        return Err("the runs have no logged loss to draw".into());
    }
    let last_step = points().map(|p| p.0).fold(1.0, f64::max);
    let low = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let high = points().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let margin = ((high - low) * 0.05).max(1e-3);
    let failed = |e: &dyn std::fmt::Display| format!("cannot draw `{}`: {e}", out.display());
    let root = BitMapBackend::new(out, (1024, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 28))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..last_step, (low - margin)..(high + margin))
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|step| format!("{step:.0}"))
        .y_desc("loss")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| failed(&e))?;
    for (index, c) in curves.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(
                c.train.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| failed(&e))?
            .label(format!("{} (train)", c.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if !c.validation.is_empty() {
            chart
                .draw_series(
                    c.validation
                        .iter()
                        .map(|&p| Circle::new(p, 5, color.filled())),
                )
                .map_err(|e| failed(&e))?
                .label(format!("{} (validation)", c.name))
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))
}
