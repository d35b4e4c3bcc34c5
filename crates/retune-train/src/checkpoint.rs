//! Atomic files and checkpoints: a `kill -9` at any moment leaves the last complete checkpoint
//! usable.
//!
//! A checkpoint is a folder `checkpoints/step-N/` in the run folder. It is written as
//! `checkpoints/.tmp-step-N/`: every file is written and fsynced, then `manifest.json` (size and
//! sha256 of every file) and `trainer_state.json` (last), then the folder is fsynced, renamed to
//! `step-N` and `checkpoints/` is fsynced. The rename is the moment of completion: a `step-N`
//! folder is always whole, and `.tmp-*` leftovers of an interrupted write are ignored and
//! removed by [`latest_checkpoint`]. Pruning renames a folder to `.tmp-delete-*` before deleting
//! it, so a half-deleted checkpoint is never mistaken for a whole one.
//!
//! Tensors are stored with the `safetensors` crate ([`save_tensors`], [`load_tensors`]).

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// File of the trainer state inside a checkpoint (written last).
pub const STATE_FILE: &str = "trainer_state.json";
/// File of the sizes and checksums of a checkpoint's other files.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Prefix of folders being written or deleted.
const TMP_PREFIX: &str = ".tmp-";

/// What can go wrong reading or writing run-folder files. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done: "writing", "reading", ...
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file was read but its content is wrong.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong and, where known, the fix.
        reason: String,
    },
}

impl StoreError {
    /// Shorthand for [`StoreError::Format`].
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        StoreError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Shorthand for results in this module.
type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Fsyncs a folder, so that renames and new entries in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing folder", dir))
}

/// Writes `path` atomically: into a temporary file beside it, fsynced, then renamed over `path`,
/// and the folder fsynced. A reader (or a crash) sees the old file or the new one, never half.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let dir = parent_of(path);
    fs::create_dir_all(&dir).map_err(io_err("creating folder", &dir))?;
    let tmp = tmp_sibling(path);
    write_synced(&tmp, write)?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    sync_dir(&dir)
}

/// The folder holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `dir/.name.tmp`, the temporary twin of `dir/name`.
fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    parent_of(path).join(format!(".{name}.tmp"))
}

/// Creates `path`, writes it through a buffer, flushes and fsyncs it.
fn write_synced(path: &Path, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<()> {
    let file = fs::File::create(path).map_err(io_err("creating", path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write(&mut w).map_err(io_err("writing", path))?;
    let file = w
        .into_inner()
        .map_err(|e| io_err("writing", path)(e.into_error()))?;
    file.sync_all().map_err(io_err("syncing", path))
}

/// A borrowed f32 tensor as safetensors wants it.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Writes named f32 tensors `(name, shape, data)` to `path` in safetensors format (not
/// atomically; see [`save_tensors`]).
fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    for (name, shape, data) in tensors {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(StoreError::format(
                path,
                format!(
                    "tensor `{name}` has shape {shape:?} ({n} elements) but {} values",
                    data.len()
                ),
            ));
        }
    }
    let views = tensors.iter().map(|(name, shape, data)| {
        (
            name.as_str(),
            F32View {
                shape: shape.as_slice(),
                data,
            },
        )
    });
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| StoreError::format(path, format!("writing safetensors: {e}")))?;
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing", path))
}

/// Saves named f32 tensors `(name, shape, data)` to `path` atomically (temporary file, fsync,
/// rename), in safetensors format.
pub fn save_tensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let dir = parent_of(path);
    fs::create_dir_all(&dir).map_err(io_err("creating folder", &dir))?;
    let tmp = tmp_sibling(path);
    write_tensors(&tmp, tensors)?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    sync_dir(&dir)
}

/// Named f32 tensors: name to (shape, data).
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Loads every tensor of a safetensors file; each must be f32.
pub fn load_tensors(path: &Path) -> Result<TensorMap> {
    let bytes = fs::read(path).map_err(io_err("reading", path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        StoreError::format(
            path,
            format!("not a valid safetensors file ({e}); it may be truncated"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(StoreError::format(
                path,
                format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

/// What the trainer needs to continue exactly where a checkpoint left off.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed (also the scheduler's position).
    pub step: u64,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// Epoch in progress, from 0.
    pub epoch: u64,
    /// Index into this epoch's shuffled order of the next item to train on.
    pub data_position: u64,
    /// The run's seed.
    pub seed: u64,
    /// RNG state words (e.g. a ChaCha seed and word position as u64s), opaque here.
    pub rng: Vec<u64>,
    /// Lowest evaluation loss so far.
    pub best_eval_loss: Option<f64>,
    /// Step of that evaluation.
    pub best_step: Option<u64>,
    /// Evaluations in a row without improvement (early stopping).
    pub evals_without_improvement: u64,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// Training wall time so far, in seconds.
    pub elapsed_s: f64,
    /// Anything else the trainer must restore (e.g. the retention baseline).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl TrainerState {
    /// Reads `trainer_state.json` from a checkpoint folder.
    pub fn load(checkpoint_dir: &Path) -> Result<Self> {
        let path = checkpoint_dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        serde_json::from_str(&text).map_err(|e| StoreError::format(&path, e.to_string()))
    }
}

/// The content of one checkpoint file.
pub enum Contents<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// Named f32 tensors `(name, shape, data)`, written as safetensors.
    Tensors(&'a [(String, Vec<usize>, &'a [f32])]),
    /// Whatever this function writes.
    Writer(&'a dyn Fn(&mut dyn Write) -> io::Result<()>),
}

/// Size and checksum of one checkpoint file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// Lowercase hex sha256.
    pub sha256: String,
}

/// `manifest.json`: the files of a checkpoint with their sizes and checksums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The checkpoint's step.
    pub step: u64,
    /// File name to size and checksum (the state and manifest files excluded).
    pub files: BTreeMap<String, FileEntry>,
}

/// Size and sha256 of a file, read back from disk.
pub fn file_entry(path: &Path) -> Result<FileEntry> {
    let bytes = fs::metadata(path).map_err(io_err("reading", path))?.len();
    let sha256 = retune_assets::sha256_file(path).map_err(|e| match e {
        retune_assets::AssetError::Io { source, .. } => io_err("reading", path)(source),
        other => StoreError::format(path, other.to_string()),
    })?;
    Ok(FileEntry { bytes, sha256 })
}

/// The `checkpoints/` folder of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes checkpoint `step` of the run in `run_dir`: `files` (plain names), a manifest and
/// `state`, into a temporary folder renamed to `checkpoints/step-N/` once all is on disk.
/// Returns that folder. An existing `step-N` is replaced.
pub fn write_checkpoint(
    run_dir: &Path,
    step: u64,
    files: &[(&str, Contents<'_>)],
    state: &TrainerState,
) -> Result<PathBuf> {
    let ckpts = checkpoints_dir(run_dir);
    if !ckpts.is_dir() {
        fs::create_dir_all(&ckpts).map_err(io_err("creating folder", &ckpts))?;
        sync_dir(run_dir)?;
    }
    let tmp = ckpts.join(format!("{TMP_PREFIX}step-{step}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err("removing", &tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err("creating folder", &tmp))?;
    let mut manifest = Manifest {
        step,
        files: BTreeMap::new(),
    };
    for (name, contents) in files {
        let bad_name = name.is_empty()
            || name.contains(['/', '\\'])
            || name.starts_with('.')
            || [STATE_FILE, MANIFEST_FILE].contains(name);
        if bad_name || manifest.files.contains_key(*name) {
            return Err(StoreError::format(
                tmp.join(name),
                "checkpoint file names must be plain, unique, and not a reserved name",
            ));
        }
        let path = tmp.join(name);
        match contents {
            Contents::Bytes(b) => write_synced(&path, |w| w.write_all(b))?,
            Contents::Tensors(t) => write_tensors(&path, t)?,
            Contents::Writer(f) => write_synced(&path, |w| f(w))?,
        }
        manifest.files.insert(name.to_string(), file_entry(&path)?);
    }
    write_json_synced(&tmp.join(MANIFEST_FILE), &manifest)?;
    write_json_synced(&tmp.join(STATE_FILE), state)?;
    sync_dir(&tmp)?;
    let done = ckpts.join(format!("step-{step}"));
    let replaced = ckpts.join(format!("{TMP_PREFIX}replaced-step-{step}"));
    if done.exists() {
        if replaced.exists() {
            fs::remove_dir_all(&replaced).map_err(io_err("removing", &replaced))?;
        }
        fs::rename(&done, &replaced).map_err(io_err("renaming", &done))?;
    }
    fs::rename(&tmp, &done).map_err(io_err("renaming into place", &done))?;
    sync_dir(&ckpts)?;
    if replaced.exists() {
        fs::remove_dir_all(&replaced).map_err(io_err("removing", &replaced))?;
    }
    Ok(done)
}

/// Writes `v` as pretty JSON to `path`, fsynced.
fn write_json_synced<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| StoreError::format(path, e.to_string()))?;
    write_synced(path, |w| {
        w.write_all(text.as_bytes())
            .and_then(|()| w.write_all(b"\n"))
    })
}

/// Complete checkpoints of a run, oldest first. Leaves `.tmp-*` folders alone.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let ckpts = checkpoints_dir(run_dir);
    let entries = match fs::read_dir(&ckpts) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("reading folder", &ckpts)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("reading folder", &ckpts))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if path.join(STATE_FILE).is_file() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint of a run, if any. Removes `.tmp-*` leftovers of interrupted
/// writes and deletions first (only one trainer writes a run folder at a time).
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    let ckpts = checkpoints_dir(run_dir);
    if let Ok(entries) = fs::read_dir(&ckpts) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let path = entry.path();
                match fs::remove_dir_all(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_err("removing stale", &path)(e))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(list_checkpoints(run_dir)?.pop())
}

/// Checks every file of a checkpoint against its manifest (size and sha256) and returns the
/// trainer state.
pub fn verify_checkpoint(checkpoint_dir: &Path) -> Result<TrainerState> {
    let path = checkpoint_dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| StoreError::format(&path, e.to_string()))?;
    for (name, want) in &manifest.files {
        let file = checkpoint_dir.join(name);
        let got = file_entry(&file)?;
        if &got != want {
            return Err(StoreError::format(
                &file,
                format!(
                    "does not match the manifest ({} bytes, sha256 {}; expected {} bytes, sha256 {}): the checkpoint is damaged",
                    got.bytes, got.sha256, want.bytes, want.sha256
                ),
            ));
        }
    }
    let state = TrainerState::load(checkpoint_dir)?;
    if state.step != manifest.step {
        return Err(StoreError::format(
            checkpoint_dir.join(STATE_FILE),
            format!(
                "step {} but the manifest says {}",
                state.step, manifest.step
            ),
        ));
    }
    Ok(state)
}

/// Deletes all but the newest `keep_last` checkpoints, never the one of step `keep` (the best).
/// `keep_last = 0` keeps everything. Returns the steps deleted.
pub fn prune_checkpoints(run_dir: &Path, keep_last: usize, keep: Option<u64>) -> Result<Vec<u64>> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let all = list_checkpoints(run_dir)?;
    let cut = all.len().saturating_sub(keep_last);
    let mut removed = Vec::new();
    for (step, path) in &all[..cut] {
        if Some(*step) == keep {
            continue;
        }
        let doomed = checkpoints_dir(run_dir).join(format!("{TMP_PREFIX}delete-step-{step}"));
        fs::rename(path, &doomed).map_err(io_err("renaming", path))?;
        fs::remove_dir_all(&doomed).map_err(io_err("removing", &doomed))?;
        removed.push(*step);
    }
    if !removed.is_empty() {
        sync_dir(&checkpoints_dir(run_dir))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            total_steps: 1000,
            epoch: step / 7,
            data_position: step % 7,
            seed: 42,
            rng: vec![step, u64::MAX - step],
            best_eval_loss: Some(2.5),
            best_step: Some(step.saturating_sub(1)),
            tokens_seen: step * 1024,
            elapsed_s: step as f64 * 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn tensors_round_trip_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/w.safetensors");
        let a = [1.0f32, -2.5, 3.25, 0.0, f32::MIN_POSITIVE, 1e30];
        let b = [7.0f32];
        save_tensors(
            &path,
            &[("a".into(), vec![2, 3], &a), ("b".into(), vec![1], &b)],
        )
        .unwrap();
        let back = load_tensors(&path).unwrap();
        assert_eq!(back["a"], (vec![2, 3], a.to_vec()));
        assert_eq!(back["b"], (vec![1], vec![7.0]));
        assert!(!dir.path().join("sub/.w.safetensors.tmp").exists());
        // Truncated: an error that names the file.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = load_tensors(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: not a valid safetensors file", path.display())),
            "{e}"
        );
        // Shape and data disagree.
        let e = save_tensors(&path, &[("c".into(), vec![4], &b)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor `c` has shape [4] (4 elements) but 1 values"),
            "{e}"
        );
        let e = load_tensors(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("reading ") && e.contains("none"), "{e}");
    }

    #[test]
    fn checkpoints_are_written_listed_verified_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        assert_eq!(latest_checkpoint(run).unwrap(), None);
        let w = [0.5f32; 6];
        for step in [10, 20, 30, 40] {
            let tensors = [("w".to_string(), vec![6], &w[..])];
            let p = write_checkpoint(
                run,
                step,
                &[
                    ("adapter.safetensors", Contents::Tensors(&tensors)),
                    ("notes.txt", Contents::Bytes(b"abc")),
                    (
                        "scheduler.json",
                        Contents::Writer(&|w| write!(w, "{{\"step\":{step}}}")),
                    ),
                ],
                &state(step),
            )
            .unwrap();
            assert_eq!(p, run.join(format!("checkpoints/step-{step}")));
        }
        let (step, path) = latest_checkpoint(run).unwrap().unwrap();
        assert_eq!(step, 40);
        assert_eq!(verify_checkpoint(&path).unwrap(), state(40));
        assert_eq!(
            fs::read_to_string(path.join("scheduler.json")).unwrap(),
            "{\"step\":40}"
        );
        // sha256("abc") (FIPS 180-2).
        let m: Manifest =
            serde_json::from_str(&fs::read_to_string(path.join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(
            m.files["notes.txt"].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Leftovers of an interrupted write are ignored and removed.
        fs::create_dir_all(run.join("checkpoints/.tmp-step-50")).unwrap();
        fs::write(run.join("checkpoints/.tmp-step-50/trainer_state.json"), "{").unwrap();
        assert_eq!(latest_checkpoint(run).unwrap().unwrap().0, 40);
        assert!(!run.join("checkpoints/.tmp-step-50").exists());
        // Keep the newest two and the best (step 10).
        assert_eq!(prune_checkpoints(run, 2, Some(10)).unwrap(), vec![20]);
        let steps: Vec<u64> = list_checkpoints(run).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![10, 30, 40]);
        // Damage is detected and named.
        fs::write(path.join("notes.txt"), "abd").unwrap();
        let e = verify_checkpoint(&path).unwrap_err().to_string();
        assert!(e.contains("notes.txt: does not match the manifest"), "{e}");
        // Rewriting a step replaces it whole.
        write_checkpoint(
            run,
            40,
            &[("notes.txt", Contents::Bytes(b"new"))],
            &state(40),
        )
        .unwrap();
        assert_eq!(verify_checkpoint(&path).unwrap().step, 40);
        assert!(!path.join("adapter.safetensors").exists());
        // Reserved names are refused.
        let e = write_checkpoint(run, 50, &[(STATE_FILE, Contents::Bytes(b""))], &state(50));
        assert!(e.is_err());
    }

    /// Environment variable that turns [`kill_child_writer`] into the child process.
    const CHILD_ENV: &str = "RETUNE_TRAIN_KILL_TEST_RUN_DIR";
    /// Elements of the large tensor of each child checkpoint (16 MiB).
    const CHILD_TENSOR: usize = 4 << 20;

    /// The value the child stores at index `i` of step `step`'s tensor.
    fn pattern(step: u64, i: usize) -> f32 {
        ((step as usize * 7919 + i) % 65_521) as f32
    }

    /// Child mode of the kill test (a no-op otherwise): resumes from the latest checkpoint and
    /// writes checkpoints of large files in a loop, pruning to the last two, until killed.
    #[test]
    fn kill_child_writer() {
        let Ok(run) = std::env::var(CHILD_ENV) else {
            return;
        };
        let run = Path::new(&run);
        let mut step = latest_checkpoint(run).unwrap().map_or(0, |c| c.0);
        let mut big = vec![0f32; CHILD_TENSOR];
        for _ in 0..10_000 {
            step += 1;
            big.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = pattern(step, i));
            let tensors = [("w".to_string(), vec![CHILD_TENSOR], &big[..])];
            let bytes = vec![step as u8; 1 << 20];
            write_checkpoint(
                run,
                step,
                &[
                    ("weights.safetensors", Contents::Tensors(&tensors)),
                    ("blob.bin", Contents::Bytes(&bytes)),
                ],
                &state(step),
            )
            .unwrap();
            prune_checkpoints(run, 2, None).unwrap();
        }
    }

    /// `kill -9` at random moments while checkpoints are being written: each time, the newest
    /// complete checkpoint verifies (manifest checksums), its state and tensors load, and the
    /// step never goes back. Repeats until at least 3 kills landed mid-write.
    #[test]
    fn kill_9_during_checkpoint_writes_leaves_the_last_complete_one_usable() {
        use rand::Rng;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let exe = std::env::current_exe().unwrap();
        let mut rng = rand::thread_rng();
        let (mut last, mut mid_write, mut rounds) = (0u64, 0, 0);
        while (mid_write < 3 || rounds < 5) && rounds < 40 {
            rounds += 1;
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "checkpoint::tests::kill_child_writer",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, run)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Wait for progress past the last checkpoint, then kill at a random moment.
            let start = Instant::now();
            while list_checkpoints(run).unwrap().last().map_or(0, |c| c.0) <= last {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "child made no progress"
                );
                assert!(child.try_wait().unwrap().is_none(), "child exited early");
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            let leftovers = fs::read_dir(checkpoints_dir(run))
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-step-"));
            mid_write += usize::from(leftovers);
            let (step, path) = latest_checkpoint(run)
                .unwrap()
                .expect("a complete checkpoint");
            assert!(
                step > last,
                "round {rounds}: step went from {last} to {step}"
            );
            let st = verify_checkpoint(&path).unwrap();
            assert_eq!(st, state(step));
            let t = load_tensors(&path.join("weights.safetensors")).unwrap();
            let (shape, data) = &t["w"];
            assert_eq!(shape, &vec![CHILD_TENSOR]);
            assert!(data.iter().enumerate().all(|(i, &x)| x == pattern(step, i)));
            assert_eq!(
                fs::read(path.join("blob.bin")).unwrap(),
                vec![step as u8; 1 << 20]
            );
            last = step;
        }
        eprintln!("kill test: {rounds} kills, {mid_write} mid-write, last step {last}");
        assert!(
            mid_write >= 3,
            "only {mid_write} of {rounds} kills landed mid-write"
        );
    }
}
