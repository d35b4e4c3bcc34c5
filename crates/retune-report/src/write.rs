//! Writing every report of a run into its folder, each file atomically.

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::record::{build_record, output_dir, DisclosureRecord};
use crate::{page, plot, render};
use retune_train::config::RunConfig;
use retune_train::trainer::RunSummary;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed and
/// synced, then renamed over `path` (readers see the old file or the new, never a part).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("writing", path, e));
    }
    // Make the rename itself durable; a folder that cannot be opened is no reason to fail.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Builds the record of the run and writes, in `run_dir`: `disclosure.json`,
/// `disclosure.jsonld`, `disclosure.jats.xml`, `loss.svg`, `retention.svg`, `index.html`; and
/// the model card `README.md` into `adapter/` or `model/` when that exists. Returns the record.
pub fn write_all(
    run_dir: &Path,
    config: &RunConfig,
    summary: Option<&RunSummary>,
    error: Option<&str>,
) -> Result<DisclosureRecord> {
    let record = build_record(run_dir, config, summary, error)?;
    let metrics = Metrics::read(&run_dir.join("metrics.jsonl"))?;
    write_reports(run_dir, &record, &metrics, &config.to_toml_string())?;
    Ok(record)
}

/// Writes the renderings of `record` (see [`write_all`]).
pub fn write_reports(
    run_dir: &Path,
    record: &DisclosureRecord,
    metrics: &Metrics,
    config_text: &str,
) -> Result<()> {
    let card = render::to_markdown(record);
    let loss = plot::loss_svg(metrics);
    let retention = plot::retention_svg(metrics);
    let html = page::index_html(record, &card, &loss, &retention, config_text);
    let files: [(&str, &str); 6] = [
        ("disclosure.json", &render::to_json(record)),
        ("disclosure.jsonld", &render::to_jsonld(record)),
        ("disclosure.jats.xml", &render::to_jats(record)),
        ("loss.svg", &loss),
        ("retention.svg", &retention),
        ("index.html", &html),
    ];
    for (name, text) in files {
        write_atomically(&run_dir.join(name), text.as_bytes())?;
    }
    if let Some(out) = output_dir(run_dir) {
        write_atomically(&out.join("README.md"), card.as_bytes())?;
    }
    Ok(())
}
