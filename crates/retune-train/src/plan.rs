//! The memory plan of a run, made before any weight is read: how the base is held, the
//! estimated peak, what the machine has available, and a refusal with the options when the
//! run does not fit (never an allocation abort halfway through loading).

use crate::config::{Dtype, MethodKind, Quantize, RunConfig};
use crate::TrainError;
use candle_core::quantized::GgmlDType;
use retune_core::load::held::Hold;
use retune_core::load::inspect_model;
use retune_core::model::memory::{self, gib, Estimate};

/// Overrides the available memory the plan compares with (bytes, or with a `K`, `M`, `G`
/// suffix): for tests of the refusal, and to leave room for other work.
pub const AVAILABLE_VAR: &str = "RETUNE_MEMORY_AVAILABLE";

/// How a run holds its model and what it needs.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// `Some`: the frozen base is held in its storage type ([`Model::from_held`]); `None`:
    /// every weight in f32.
    ///
    /// [`Model::from_held`]: retune_core::model::Model::from_held
    pub hold: Option<Hold>,
    /// The estimated peak, by part.
    pub estimate: Estimate,
    /// The memory available to the run, when known.
    pub available: Option<u64>,
}

/// The type `model.quantize` names.
pub fn quantize_type(q: Quantize) -> Option<GgmlDType> {
    match q {
        Quantize::None => None,
        Quantize::Q8_0 => Some(GgmlDType::Q8_0),
        Quantize::Q4_0 => Some(GgmlDType::Q4_0),
        Quantize::Q4K => Some(GgmlDType::Q4K),
    }
}

/// The memory available to a new run: [`AVAILABLE_VAR`] when set, else `MemAvailable`.
pub fn available_bytes() -> Result<Option<u64>, TrainError> {
    let Ok(text) = std::env::var(AVAILABLE_VAR) else {
        return Ok(memory::available_bytes());
    };
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => u32::MAX,
    };
    match digits.trim().parse::<f64>() {
        Ok(v) if shift != u32::MAX && v >= 0.0 => Ok(Some((v * (1u64 << shift) as f64) as u64)),
        _ => Err(TrainError::Invalid(format!(
            "{AVAILABLE_VAR}={text:?} is not a size: give bytes or a number with K, M or G"
        ))),
    }
}

impl MemoryPlan {
    /// The plan of `config`, from the model's headers and metadata only.
    pub fn of(config: &RunConfig) -> Result<Self, TrainError> {
        let path = &config.model.path;
        let summary = inspect_model(path)?;
        let cfg = &summary.config;
        let lora = config.method.kind == MethodKind::Lora;
        let quantize = quantize_type(config.model.quantize);
        let bf16 = config.model.dtype == Dtype::Bf16;
        let quantised_source = summary
            .stored_dtypes
            .values()
            .any(|d| !matches!(d.as_str(), "F32" | "F16" | "BF16"));
        // A frozen base is held once in its storage type under bf16 products (the bf16
        // rounding the products apply anyway), when quantised on load, and when its file is
        // quantised; an f32 run of a float model keeps the exact f32 path.
        let hold = (lora && (bf16 || quantize.is_some() || quantised_source)).then_some(Hold {
            quantize,
            dense: if bf16 {
                GgmlDType::BF16
            } else {
                GgmlDType::F32
            },
        });
        let weights = match &hold {
            Some(h) => memory::held_weight_bytes(cfg, &summary.stored_dtypes, h),
            None => memory::f32_weight_bytes(cfg),
        };
        let trainable = match lora {
            true => lora_params(config, cfg),
            false => cfg.param_count(),
        };
        let rows = config.train.batch_size
            * if config.objective.kind.is_preference() {
                2
            } else {
                1
            };
        let estimate =
            memory::training_estimate(cfg, rows, config.data.max_seq_len, trainable, weights);
        Ok(MemoryPlan {
            hold,
            estimate,
            available: available_bytes()?,
        })
    }

    /// One line for the start of a run.
    pub fn line(&self) -> String {
        let e = &self.estimate;
        let held = match &self.hold {
            None => "weights in f32".to_string(),
            Some(h) => match h.quantize {
                Some(q) => format!(
                    "base held quantised ({})",
                    retune_core::ops::stored::type_name(q)
                ),
                None => format!(
                    "base held in its stored types ({} for float matrices)",
                    retune_core::ops::stored::type_name(h.dense)
                ),
            },
        };
        let available = self.available.map_or("unknown".into(), gib);
        format!(
            "memory plan: estimated peak {} ({held}: {}, trainable state {}, activations {}, \
             process {}); available {available}",
            gib(e.total()),
            gib(e.weights),
            gib(e.trainable),
            gib(e.activations),
            gib(e.process),
        )
    }

    /// Refuses a run whose estimate exceeds the available memory, with the options.
    pub fn check(&self, config: &RunConfig) -> Result<(), TrainError> {
        let Some(available) = self.available else {
            return Ok(());
        };
        let need = self.estimate.total();
        if need <= available {
            return Ok(());
        }
        let mut options = Vec::new();
        if config.method.kind == MethodKind::Full {
            options
                .push("method.kind = \"lora\" (the base is then frozen and held once)".to_string());
        }
        if config.method.kind == MethodKind::Lora && config.model.quantize != Quantize::Q4_0 {
            options.push(
                "model.quantize = \"q4_0\" or \"q4_k\" (QLoRA; a quantised GGUF keeps its blocks)"
                    .into(),
            );
        }
        if config.train.batch_size > 1 {
            options.push(format!(
                "a smaller train.batch_size (now {}) with train.grad_accum for the same batch",
                config.train.batch_size
            ));
        }
        options.push(format!(
            "a shorter data.max_seq_len (now {})",
            config.data.max_seq_len
        ));
        Err(TrainError::Invalid(format!(
            "this run needs about {} but {} is available ({}): refused before loading the \
             model. Options:\n  - {}",
            gib(need),
            gib(available),
            self.line(),
            options.join("\n  - ")
        )))
    }
}

/// Parameters of the adapter the run trains (r on its targets, every layer).
fn lora_params(config: &RunConfig, cfg: &retune_core::config::LlamaConfig) -> usize {
    let r = config.method.r;
    config
        .method
        .targets
        .modules()
        .iter()
        .map(|t| {
            let (d_in, d_out) = retune_core::model::lora::target_shape(cfg, *t);
            r * (d_in + d_out) * cfg.num_hidden_layers
        })
        .sum()
}
