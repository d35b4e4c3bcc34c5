//! Shared by the trainer's integration tests: the tiny GGUF fixture and quiet options.

use retune_train::trainer::TrainOptions;
use std::path::{Path, PathBuf};

/// The tiny SmolLM-shaped GGUF fixture (byte-level tokenizer).
pub fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm-tiny/model-f32.gguf")
}

/// Options of a run that prints nothing and runs to the end.
pub fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        stop_after: None,
    }
}
