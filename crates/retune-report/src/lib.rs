//! retune-report: what a run used, did and produced, precise enough to reproduce and to check.
//!
//! - [`record`]: [`DisclosureRecord`], built by [`build_record`] from a run folder, its
//!   configuration and (when the run finished) its [`RunSummary`](retune_train::trainer::RunSummary):
//!   the base model with the sha256 of every weight file, of the tokenizer and of the chat
//!   template; every data file with its sha256 and row counts; the method and every
//!   hyper-parameter; the environment; the results; the sha256 of every output file.
//! - [`render`]: the record as JSON, JSON-LD (schema.org, the CASRAI term for fine-tuning),
//!   a JATS methods `<sec>` and a Hugging Face model card (Markdown).
//! - [`plot`]: `loss.svg` and `retention.svg`, hand-written SVG.
//! - [`page`]: a self-contained `index.html`.
//! - [`write_all`]: every file above, written atomically into the run folder.
//! - [`verify`]: [`check_base`], is this model the base an adapter was trained on?
#![deny(missing_docs)]

pub mod error;
pub mod metrics;
pub mod page;
pub mod plot;
pub mod record;
pub mod render;
pub mod verify;
mod write;

pub use error::{Error, Result};
pub use metrics::Metrics;
pub use record::{build_record, DisclosureRecord, Status};
pub use verify::{check_base, BaseCheck, Evidence};
pub use write::{write_all, write_atomically, write_reports};
