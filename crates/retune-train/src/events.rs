//! The run folder's logs: `events.jsonl`, `metrics.jsonl` and the resolved `config.toml`.
//!
//! `events.jsonl` holds one JSON object per line, `{"time": RFC 3339 UTC, "event": name, ...}`;
//! `metrics.jsonl` holds step rows `{step, loss, lr, grad_norm, tokens, tokens_per_s}` and eval
//! rows `{step, eval_loss, perplexity, accuracy}`. Both are appended to (a resumed run goes on in
//! the same files), one `write` and flush per line, so a crash loses at most the line being
//! written. `config.toml` is written atomically.

use crate::checkpoint::{write_atomically, StoreError};
use crate::config::RunConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// File names in the run folder.
pub const EVENTS_FILE: &str = "events.jsonl";
/// Metrics rows.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The resolved configuration.
pub const CONFIG_FILE: &str = "config.toml";

/// Shorthand for results in this module.
type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The kinds of event (the `"event"` field). Names are a contract: extend, never rename.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Reading and checking the data files.
    ValidatingFiles,
    /// Training starts (or resumes).
    Started,
    /// An optimizer step.
    Step,
    /// An evaluation.
    Eval,
    /// A checkpoint was written.
    Checkpoint,
    /// A retention (general-text perplexity) measurement.
    Retention,
    /// The run ended normally.
    Finished,
    /// The run stopped on an error.
    Failed,
}

impl Event {
    /// The `"event"` value.
    pub fn name(self) -> &'static str {
        match self {
            Event::ValidatingFiles => "validating_files",
            Event::Started => "started",
            Event::Step => "step",
            Event::Eval => "eval",
            Event::Checkpoint => "checkpoint",
            Event::Retention => "retention",
            Event::Finished => "finished",
            Event::Failed => "failed",
        }
    }
}

/// `time` as RFC 3339 UTC with milliseconds, e.g. `2026-05-01T12:34:56.789Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let d = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-compatible date algorithms").
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// An append-only JSON Lines file, one write and flush per line.
#[derive(Debug)]
struct JsonLines {
    file: fs::File,
    path: PathBuf,
}

impl JsonLines {
    fn open(path: PathBuf) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                action: "creating folder",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                action: "opening",
                path: path.clone(),
                source,
            })?;
        Ok(JsonLines { file, path })
    }

    fn append(&mut self, value: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_string(value)
            .map_err(|e| StoreError::format(&self.path, e.to_string()))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| StoreError::Io {
                action: "appending to",
                path: self.path.clone(),
                source,
            })
    }
}

/// `events.jsonl` of a run.
#[derive(Debug)]
pub struct EventLog {
    lines: JsonLines,
}

impl EventLog {
    /// Opens (creating or appending to) `run_dir/events.jsonl`.
    pub fn open(run_dir: &Path) -> Result<Self> {
        Ok(EventLog {
            lines: JsonLines::open(run_dir.join(EVENTS_FILE))?,
        })
    }

    /// Appends `{"time": now, "event": name, ...fields}`. `fields` must serialise to a JSON
    /// object (e.g. `serde_json::json!({"step": 3, "loss": 2.1})`) or null; its own `time` and
    /// `event` keys, if any, are ignored. Non-finite numbers are written as `null`.
    pub fn emit(&mut self, event: Event, fields: impl Serialize) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("time".into(), rfc3339(SystemTime::now()).into());
        obj.insert("event".into(), event.name().into());
        let fields = serde_json::to_value(fields)
            .map_err(|e| StoreError::format(&self.lines.path, e.to_string()))?;
        match fields {
            Value::Object(map) => {
                for (k, v) in map {
                    if k != "time" && k != "event" {
                        obj.insert(k, v);
                    }
                }
            }
            Value::Null => {}
            other => {
                return Err(StoreError::format(
                    &self.lines.path,
                    format!("event fields must be a JSON object, got {other}"),
                ))
            }
        }
        self.lines.append(&obj)
    }
}

/// A `metrics.jsonl` row after an optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRow {
    /// Optimizer steps completed (from 1).
    pub step: u64,
    /// Mean loss per target token over the step's accumulated batch.
    pub loss: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed in this step (input tokens of all its micro-batches).
    pub tokens: u64,
    /// `tokens` over the step's wall time.
    pub tokens_per_s: f64,
    /// Objective-specific figures under their customary names (preference objectives:
    /// `rewards/chosen`, `rewards/margins`, ... as TRL logs them).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// A `metrics.jsonl` row after an evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    /// Optimizer steps completed when evaluated (0: before training).
    pub step: u64,
    /// Mean loss per predicted token on the eval set.
    pub eval_loss: f64,
    /// `exp(eval_loss)`.
    pub perplexity: f64,
    /// Share of predicted tokens whose argmax was right (preference objectives: the share of
    /// pairs whose chosen reward exceeds the rejected one).
    pub accuracy: f64,
    /// Objective-specific figures (preference objectives: `eval_rewards/chosen`, ...).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// A `metrics.jsonl` row after measuring general-text (retention) perplexity, windowed as
/// `retune eval` windows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetentionRow {
    /// Optimizer steps completed when measured (0: the base model).
    pub step: u64,
    /// Mean loss per predicted token on the general text.
    pub retention_loss: f64,
    /// `exp(retention_loss)`.
    pub retention_perplexity: f64,
    /// Tokens predicted.
    pub retention_tokens: u64,
}

/// One row of `metrics.jsonl`, any kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricsRow {
    /// Written by [`MetricsLog::eval`] (tried first: it has `eval_loss`).
    Eval(EvalRow),
    /// Written by [`MetricsLog::retention`].
    Retention(RetentionRow),
    /// Written by [`MetricsLog::step`].
    Step(StepRow),
}

impl MetricsRow {
    /// The row's step.
    pub fn step(&self) -> u64 {
        match self {
            MetricsRow::Eval(r) => r.step,
            MetricsRow::Retention(r) => r.step,
            MetricsRow::Step(r) => r.step,
        }
    }
}

/// `metrics.jsonl` of a run.
#[derive(Debug)]
pub struct MetricsLog {
    lines: JsonLines,
}

impl MetricsLog {
    /// Opens (creating or appending to) `run_dir/metrics.jsonl`.
    pub fn open(run_dir: &Path) -> Result<Self> {
        Ok(MetricsLog {
            lines: JsonLines::open(run_dir.join(METRICS_FILE))?,
        })
    }

    /// Opens `metrics.jsonl` to resume from a checkpoint at `step`: rows of later steps
    /// (logged after that checkpoint by the interrupted run) and a torn last line are dropped
    /// first, atomically, so the resumed file equals an uninterrupted one.
    pub fn open_for_resume(run_dir: &Path, step: u64) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        let rows = match read_metrics(&path) {
            Ok(rows) => rows,
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let kept: Vec<&MetricsRow> = rows.iter().filter(|r| r.step() <= step).collect();
        write_atomically(&path, |w| {
            for row in &kept {
                serde_json::to_writer(&mut *w, row)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        Self::open(run_dir)
    }

    /// Appends a step row.
    pub fn step(&mut self, row: &StepRow) -> Result<()> {
        self.lines.append(row)
    }

    /// Appends an eval row.
    pub fn eval(&mut self, row: &EvalRow) -> Result<()> {
        self.lines.append(row)
    }

    /// Appends a retention row.
    pub fn retention(&mut self, row: &RetentionRow) -> Result<()> {
        self.lines.append(row)
    }
}

/// Reads a `metrics.jsonl`; a torn (unparsable) last line is skipped, any other bad line is an
/// error naming it.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>> {
    let text = fs::read_to_string(path).map_err(|source| StoreError::Io {
        action: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut rows = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<MetricsRow>(line) {
            Ok(row) => rows.push(row),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(StoreError::format(
                    path,
                    format!("line {}: not a metrics row: {e}", i + 1),
                ))
            }
        }
    }
    Ok(rows)
}

/// Writes the resolved configuration to `run_dir/config.toml` atomically; returns its path.
pub fn write_config(run_dir: &Path, config: &RunConfig) -> Result<PathBuf> {
    let path = run_dir.join(CONFIG_FILE);
    let text = format!(
        "# Resolved configuration of this run (every default written out).\n\
         # Resume with: retune train --resume {}\n\n{}",
        run_dir.display(),
        config.to_toml_string()
    );
    write_atomically(&path, |w| w.write_all(text.as_bytes()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_instants() {
        let at = |s: u64, ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        // `date -u -d @951782400` = Tue Feb 29 00:00:00 UTC 2000 (a leap day of a 400-year).
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        // `date -u -d @1767225599` = Wed Dec 31 23:59:59 UTC 2025.
        assert_eq!(at(1_767_225_599, 999), "2025-12-31T23:59:59.999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn events_are_one_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::open(dir.path()).unwrap();
        log.emit(
            Event::Started,
            json!({"total_steps": 10, "event": "ignored"}),
        )
        .unwrap();
        log.emit(Event::Step, json!({"step": 1, "loss": f64::NAN}))
            .unwrap();
        log.emit(Event::Finished, ()).unwrap();
        assert!(log.emit(Event::Failed, json!([1, 2])).is_err());
        drop(log);
        let mut log = EventLog::open(dir.path()).unwrap(); // appends
        log.emit(Event::ValidatingFiles, json!({"files": 2}))
            .unwrap();
        let text = fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap();
        let rows: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let names: Vec<&str> = rows.iter().map(|r| r["event"].as_str().unwrap()).collect();
        assert_eq!(names, ["started", "step", "finished", "validating_files"]);
        assert_eq!(rows[0]["total_steps"], 10);
        assert_eq!(rows[1]["loss"], Value::Null);
        let time = rows[0]["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z') && &time[10..11] == "T",
            "{time}"
        );
    }

    fn step_row(step: u64) -> StepRow {
        StepRow {
            step,
            loss: 2.0 / step as f64,
            lr: 1e-4,
            grad_norm: 0.5,
            tokens: 2048,
            tokens_per_s: 1000.0,
            // Objective figures on some rows, as a preference run logs them.
            extra: match step {
                3 => BTreeMap::from([("rewards/margins".to_string(), 0.75)]),
                _ => BTreeMap::new(),
            },
        }
    }

    #[test]
    fn metrics_rows_round_trip_and_resume_drops_later_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetricsLog::open(dir.path()).unwrap();
        for s in 1..=5 {
            m.step(&step_row(s)).unwrap();
        }
        let eval = EvalRow {
            step: 4,
            eval_loss: 1.5,
            perplexity: 1.5f64.exp(),
            accuracy: 0.25,
            extra: BTreeMap::from([("eval_rewards/accuracies".to_string(), 0.625)]),
        };
        m.eval(&eval).unwrap();
        drop(m);
        let path = dir.path().join(METRICS_FILE);
        let first = fs::read_to_string(&path).unwrap();
        assert!(first.starts_with(
            "{\"step\":1,\"loss\":2.0,\"lr\":0.0001,\"grad_norm\":0.5,\"tokens\":2048,\"tokens_per_s\":1000.0}\n"
        ));
        // A torn last line, as a kill mid-write would leave.
        fs::write(&path, format!("{first}{{\"step\":6,\"lo")).unwrap();
        let rows = read_metrics(&path).unwrap();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[5], MetricsRow::Eval(eval.clone()));
        // Objective figures sit flat in their row and read back into it.
        assert!(first.contains("\"tokens_per_s\":1000.0,\"rewards/margins\":0.75}"));
        assert!(first.contains("\"accuracy\":0.25,\"eval_rewards/accuracies\":0.625}"));
        assert_eq!(rows[2], MetricsRow::Step(step_row(3)));
        let mut m = MetricsLog::open_for_resume(dir.path(), 4).unwrap();
        m.step(&step_row(5)).unwrap();
        let rows = read_metrics(&path).unwrap();
        let steps: Vec<u64> = rows.iter().map(MetricsRow::step).collect();
        assert_eq!(steps, [1, 2, 3, 4, 4, 5]);
        assert_eq!(rows[4], MetricsRow::Eval(eval));
    }

    #[test]
    fn config_is_written_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RunConfig::from_toml_str(
            "[model]\npath = \"m\"\n[data]\ntrain = [\"t\"]\n",
            Path::new("/c/x.toml"),
            &["train.lr=3e-4"],
            Path::new("/c"),
        )
        .unwrap();
        let path = write_config(dir.path(), &cfg).unwrap();
        assert!(!dir.path().join(".config.toml.tmp").exists());
        assert_eq!(RunConfig::load(&path, &[] as &[&str]).unwrap(), cfg);
    }
}
