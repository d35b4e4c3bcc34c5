//! LoRA adapters in Hugging Face PEFT's format: a folder with `adapter_model.safetensors` and
//! `adapter_config.json`, as `peft.PeftModel.save_pretrained` writes it and
//! `peft.PeftModel.from_pretrained` reads it (format of peft 0.21).
//!
//! Keys are `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, D_in]`) and
//! `...lora_B.weight` (`[D_out, r]`); `y = x W^T + s (x A^T) B^T` with `s = lora_alpha / r`, or
//! `lora_alpha / sqrt(r)` with `use_rslora`.
//!
//! [`load_peft_adapter`] reads adapters written by retune and by PEFT: the adapter-name
//! segment PEFT uses in memory (`lora_A.default.weight`) is accepted, F16 and BF16 tensors are
//! converted, and `target_modules` may be a list, `"all-linear"` or a pattern string. Because
//! PEFT itself loads a misnamed key with only a warning, anything retune cannot place is an
//! error naming the key: a key that is not a LoRA weight of a known target, a missing key, a
//! shape that does not fit the base, and PEFT features retune does not implement (DoRA,
//! `modules_to_save`, LoRA biases, per-module ranks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::save::{write_json_atomic, write_safetensors, SaveDtype, TensorOut};
use super::{bf16_from_le, f16_from_le, f32_from_le, map_file};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::model::lora::{target_shape, LayerLora, LoraPair};
use crate::model::{Lora, LoraSpec, Target};

/// The adapter's weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter's configuration file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The PEFT release whose file format retune writes (recorded as `peft_version`).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";
/// The prefix PEFT puts before the base model's module names in saved keys.
const KEY_PREFIX: &str = "base_model.model.";

/// What `adapter_config.json` says, as far as retune uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    /// r, alpha, dropout, rsLoRA, and the targets: those `target_modules` lists, or every
    /// target when it says `"all-linear"`; empty for a pattern string (or null), whose targets
    /// only the keys tell.
    pub spec: LoraSpec,
    /// Whether `target_modules` named the targets (a list or `"all-linear"`): then every
    /// adapted layer must have a pair for each of them.
    pub targets_listed: bool,
    /// `layers_to_transform`: the only layers adapted, when given.
    pub layers: Option<Vec<usize>>,
    /// `exclude_modules` was given: some listed (layer, target) pairs may be absent.
    pub has_exclusions: bool,
    /// `base_model_name_or_path`, when given.
    pub base_model_name_or_path: Option<String>,
}

/// The `adapter_config.json` retune writes for `spec`: every key PEFT 0.21 writes for a LoRA
/// causal-LM adapter, with PEFT's defaults for the features retune does not use. `layers` is
/// `layers_to_transform` (`None`: every layer).
pub fn adapter_config_json(
    spec: &LoraSpec,
    base_model_name_or_path: &str,
    layers: Option<&[usize]>,
) -> Value {
    // PEFT writes lora_alpha as the int the user gave; keep integers integral.
    let alpha = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 9.0e15 {
        json!(spec.alpha as i64)
    } else {
        json!(spec.alpha)
    };
    let targets: Vec<&str> = Target::ALL
        .into_iter()
        .filter(|t| spec.targets.contains(t))
        .map(Target::name)
        .collect();
    // serde_json's map is ordered by key, as PEFT writes the file (json.dumps(sort_keys=True)).
    json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": layers,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": spec.dropout,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": spec.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "target_parameters": null,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": spec.rslora,
        "velora_config": null,
    })
}

/// Writes `lora` as a PEFT adapter folder (created if needed): `adapter_model.safetensors`
/// (F32, PEFT's keys and shapes) and `adapter_config.json`, each atomically.
/// `base_model_name_or_path` is recorded for PEFT (a hub id or a path).
pub fn save_peft_adapter(
    dir: &Path,
    lora: &Lora<f32>,
    config: &LlamaConfig,
    base_model_name_or_path: &str,
) -> Result<()> {
    lora.spec.validate()?;
    let layers = adapted_layers(lora, config)?;
    let named = lora.named(config);
    let tensors: Vec<TensorOut<'_>> = named
        .iter()
        .map(|(name, shape, data)| TensorOut {
            name: name.clone(),
            shape: shape.clone(),
            data,
        })
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(
        &dir.join(ADAPTER_WEIGHTS),
        &tensors,
        SaveDtype::F32,
        &metadata,
    )?;
    let cfg = adapter_config_json(&lora.spec, base_model_name_or_path, layers.as_deref());
    write_json_atomic(&dir.join(ADAPTER_CONFIG), &cfg)
}

/// Checks an adapter against the base configuration before it is written, and returns
/// `layers_to_transform`: `None` when every layer carries every target, else the adapted
/// layers (each must carry all of them: PEFT cannot say anything else).
fn adapted_layers(lora: &Lora<f32>, config: &LlamaConfig) -> Result<Option<Vec<usize>>> {
    let spec = &lora.spec;
    if lora.layers.len() != config.num_hidden_layers {
        return Err(Error::Invalid(format!(
            "the adapter has {} layers but the base has {}",
            lora.layers.len(),
            config.num_hidden_layers
        )));
    }
    let mut adapted = Vec::new();
    for (i, layer) in lora.layers.iter().enumerate() {
        let present: Vec<Target> = Target::ALL
            .into_iter()
            .filter(|t| layer.pairs[t.index()].is_some())
            .collect();
        if present.is_empty() {
            continue;
        }
        if let Some(t) = present.iter().find(|t| !spec.targets.contains(t)) {
            return Err(Error::Invalid(format!(
                "layer {i} adapts {}, which is not among the adapter's targets",
                t.name()
            )));
        }
        if present.len() != spec.targets.len() {
            return Err(Error::Invalid(format!(
                "layer {i} adapts only some of the adapter's targets; PEFT's format needs every \
                 adapted layer to carry all of them"
            )));
        }
        for t in present {
            let p = layer.pairs[t.index()].as_ref().expect("present");
            let (d_out, d_in) = target_shape(config, t);
            if p.a.len() != spec.r * d_in || p.b.len() != d_out * spec.r {
                return Err(Error::Invalid(format!(
                    "layer {i} {}: lora_A holds {} values and lora_B {}, expected {} ([{}, {d_in}]) \
                     and {} ([{d_out}, {}])",
                    t.name(),
                    p.a.len(),
                    p.b.len(),
                    spec.r * d_in,
                    spec.r,
                    d_out * spec.r,
                    spec.r
                )));
            }
        }
        adapted.push(i);
    }
    if adapted.is_empty() {
        return Err(Error::Invalid("the adapter adapts no layer".into()));
    }
    Ok((adapted.len() != config.num_hidden_layers).then_some(adapted))
}

/// The two files of an adapter folder, checked to exist.
fn adapter_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "not a folder: an adapter is a PEFT folder with adapter_config.json and \
             adapter_model.safetensors",
        ));
    }
    let cfg = dir.join(ADAPTER_CONFIG);
    let weights = dir.join(ADAPTER_WEIGHTS);
    if !cfg.is_file() {
        return Err(Error::format(
            &cfg,
            "missing: a PEFT adapter folder needs adapter_config.json next to \
             adapter_model.safetensors",
        ));
    }
    if !weights.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(Error::Unsupported {
                path: dir.join("adapter_model.bin"),
                reason: "PyTorch .bin adapter weights; retune reads adapter_model.safetensors \
                         (save with PEFT's save_pretrained(dir, safe_serialization=True))"
                    .into(),
            });
        }
        return Err(Error::format(
            &weights,
            "missing: a PEFT adapter folder needs adapter_model.safetensors next to \
             adapter_config.json",
        ));
    }
    Ok((cfg, weights))
}

/// Reads and checks `dir/adapter_config.json`.
pub fn read_peft_config(dir: &Path) -> Result<PeftConfig> {
    let (path, _) = adapter_files(dir)?;
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    parse_peft_config(&path, &json)
}

/// Parses an `adapter_config.json` value; `path` names the file in errors.
pub fn parse_peft_config(path: &Path, json: &Value) -> Result<PeftConfig> {
    let obj = json
        .as_object()
        .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let bad = |k: &str, want: &str, v: &Value| {
        Error::format(path, format!("field `{k}`: expected {want}, got {v}"))
    };
    let unsupported = |reason: String| Error::Unsupported {
        path: path.into(),
        reason,
    };

    match get("peft_type") {
        Some(Value::String(s)) if s == "LORA" => {}
        Some(v) => {
            return Err(Error::format(
                path,
                format!("`peft_type` is {v}: retune reads LoRA adapters (\"LORA\") only"),
            ))
        }
        None => {
            return Err(Error::format(
                path,
                "missing required field `peft_type` (\"LORA\")",
            ))
        }
    }
    match get("task_type") {
        None => {}
        Some(Value::String(s)) if s == "CAUSAL_LM" => {}
        Some(v) => {
            return Err(unsupported(format!(
                "`task_type` {v}: retune reads causal-LM adapters (\"CAUSAL_LM\")"
            )))
        }
    }
    let r = match get("r") {
        Some(v) => v
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r", "a positive integer", v))? as usize,
        None => return Err(Error::format(path, "missing required field `r`")),
    };
    let alpha = match get("lora_alpha") {
        Some(v) => v
            .as_f64()
            .filter(|a| *a > 0.0)
            .ok_or_else(|| bad("lora_alpha", "a positive number", v))?,
        None => {
            return Err(Error::format(
                path,
                "missing required field `lora_alpha` (it sets the adapter's scale)",
            ))
        }
    };
    let dropout = match get("lora_dropout") {
        Some(v) => v
            .as_f64()
            .filter(|d| (0.0..1.0).contains(d))
            .ok_or_else(|| bad("lora_dropout", "a number in [0, 1)", v))?,
        None => 0.0,
    };
    let flag = |k: &str| -> Result<bool> {
        match get(k) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| bad(k, "true or false", v)),
        }
    };
    let rslora = flag("use_rslora")?;
    for (k, what) in [
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA biases"),
        ("use_qalora", "QA-LoRA"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D layouts)"),
    ] {
        if flag(k)? {
            return Err(unsupported(format!("`{k}`: {what} adapters")));
        }
    }
    if let Some(b) = get("bias") {
        if b.as_str() != Some("none") {
            return Err(unsupported(format!(
                "`bias` {b}: adapters that train biases (retune reads bias \"none\")"
            )));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        match get(k) {
            None => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => {
                return Err(unsupported(format!(
                    "`{k}` {v}: per-module ranks or alphas"
                )))
            }
        }
    }
    for k in [
        "modules_to_save",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
    ] {
        match get(k) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => {
                return Err(unsupported(format!(
                    "`{k}` {v}: retune's adapters hold LoRA pairs on linear layers only"
                )))
            }
        }
    }

    let (targets, targets_listed) = match get("target_modules") {
        None => (Vec::new(), false),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
            (Target::ALL.to_vec(), true)
        }
        // A pattern (PEFT matches it against module names): the keys tell which targets.
        Some(Value::String(_)) => (Vec::new(), false),
        Some(Value::Array(list)) => {
            let mut set = BTreeSet::new();
            for v in list {
                let name = v
                    .as_str()
                    .ok_or_else(|| bad("target_modules", "a list of module names", v))?;
                // PEFT matches a name as a suffix of the module path (`self_attn.q_proj`).
                let last = name.rsplit('.').next().unwrap_or(name);
                let t = Target::from_name(last).ok_or_else(|| {
                    unsupported(format!(
                        "target module `{name}`: retune adapts {}",
                        Target::ALL.map(Target::name).join(", ")
                    ))
                })?;
                set.insert(t);
            }
            (set.into_iter().collect(), true)
        }
        Some(v) => return Err(bad("target_modules", "a list of module names", v)),
    };
    let layers = match get("layers_to_transform") {
        None => None,
        Some(v) => {
            let one = |v: &Value| {
                v.as_u64()
                    .map(|i| i as usize)
                    .ok_or_else(|| bad("layers_to_transform", "layer indices", v))
            };
            Some(match v {
                Value::Array(a) => a.iter().map(one).collect::<Result<Vec<_>>>()?,
                v => vec![one(v)?],
            })
        }
    };
    let has_exclusions = match get("exclude_modules") {
        None => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    let base_model_name_or_path = get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(PeftConfig {
        spec: LoraSpec {
            r,
            alpha,
            dropout,
            targets,
            rslora,
        },
        targets_listed,
        layers,
        has_exclusions,
        base_model_name_or_path,
    })
}

/// Which tensor a key names: layer, target, and whether it is `lora_A`.
fn parse_key(key: &str) -> Option<(usize, Target, bool)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let parts: Vec<&str> = rest.split('.').collect();
    // model.layers.{i}.{block}.{name}.lora_{A,B}[.{adapter name}].weight
    let (head, tail) = match parts.len() {
        7 => (&parts[..6], &parts[6..]),
        8 => (&parts[..6], &parts[7..]),
        _ => return None,
    };
    if head[0] != "model" || head[1] != "layers" || tail != ["weight"] {
        return None;
    }
    // Layer indices are plain decimals: `+1` or `01` would be a different module path to PEFT.
    if head[2].is_empty()
        || !head[2].bytes().all(|b| b.is_ascii_digit())
        || (head[2].len() > 1 && head[2].starts_with('0'))
    {
        return None;
    }
    let layer: usize = head[2].parse().ok()?;
    let target = Target::from_name(head[4])?;
    if target.path() != format!("{}.{}", head[3], head[4]) {
        return None;
    }
    let is_a = match head[5] {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    Some((layer, target, is_a))
}

/// The canonical key of a LoRA tensor (as PEFT saves it, without an adapter name).
fn key_of(layer: usize, t: Target, is_a: bool) -> String {
    format!(
        "{KEY_PREFIX}model.layers.{layer}.{}.lora_{}.weight",
        t.path(),
        if is_a { "A" } else { "B" }
    )
}

/// Reads a PEFT LoRA adapter folder for a base with configuration `config` (see the module
/// docs for what is accepted and what is an error). Values come back as f32.
pub fn load_peft_adapter(dir: &Path, config: &LlamaConfig) -> Result<Lora<f32>> {
    let (cfg_path, weights_path) = adapter_files(dir)?;
    let peft = read_peft_config(dir)?;
    let path = weights_path.as_path();
    let map = map_file(path)?;
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| Error::format(path, format!("truncated or not a safetensors file: {e}")))?;

    let r = peft.spec.r;
    let n_layers = config.num_hidden_layers;
    let mut found: BTreeMap<(usize, Target, bool), Vec<f32>> = BTreeMap::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    // Every key first (names, layers, targets), so the most telling problem is reported.
    let mut parsed = Vec::with_capacity(names.len());
    for key in &names {
        let Some((layer, t, is_a)) = parse_key(key) else {
            let hint = if !key.starts_with(KEY_PREFIX) && key.contains(".lora_") {
                format!(
                    " (PEFT saves keys under `{KEY_PREFIX}`; it would load this one with only a \
                     warning and leave the adapter at its initial weights)"
                )
            } else {
                String::new()
            };
            return Err(Error::format(
                path,
                format!(
                    "tensor `{key}` is not a LoRA weight of a known target: retune reads \
                     `{KEY_PREFIX}model.layers.{{i}}.{{self_attn,mlp}}.{{q,k,v,o,gate,up,down}}_proj.lora_{{A,B}}.weight`{hint}"
                ),
            ));
        };
        if peft.targets_listed && !peft.spec.targets.contains(&t) {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{key}` adapts {}, which `target_modules` in {} does not list",
                    t.name(),
                    cfg_path.display()
                ),
            ));
        }
        if let Some(layers) = &peft.layers {
            if !layers.contains(&layer) {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{key}` is for layer {layer}, which `layers_to_transform` in {} \
                         does not list",
                        cfg_path.display()
                    ),
                ));
            }
        }
        parsed.push((key, layer, t, is_a));
    }
    let deepest = parsed.iter().max_by_key(|p| p.1);
    if let Some((key, layer, ..)) = deepest.filter(|p| p.1 >= n_layers) {
        return Err(Error::format(
            path,
            format!(
                "adapter `{}` was trained on a model with more layers: tensor `{key}` is for \
                 layer {layer}, this base has {n_layers} layers",
                dir.display()
            ),
        ));
    }
    for (key, layer, t, is_a) in parsed {
        let view = st
            .tensor(key)
            .map_err(|e| Error::format(path, e.to_string()))?;
        let (d_out, d_in) = target_shape(config, t);
        let expected = if is_a { vec![r, d_in] } else { vec![d_out, r] };
        let got = view.shape().to_vec();
        if got != expected {
            let rank_ok = got.len() == 2 && (if is_a { got[0] } else { got[1] }) == r;
            let reason = if got.len() == 2 && !rank_ok {
                format!(
                    "tensor `{key}` is {got:?}: its rank is not r = {r} of {}",
                    cfg_path.display()
                )
            } else {
                format!(
                    "adapter `{}` was trained on a model with a different shape: tensor `{key}` \
                     is {got:?}, this base expects {expected:?}",
                    dir.display()
                )
            };
            return Err(Error::format(path, reason));
        }
        let data = match view.dtype() {
            Dtype::F32 => f32_from_le(view.data()),
            Dtype::F16 => f16_from_le(view.data()),
            Dtype::BF16 => bf16_from_le(view.data()),
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor `{key}` has dtype {other:?}; supported: F32, F16, BF16"),
                ))
            }
        };
        if found.insert((layer, t, is_a), data).is_some() {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{}` appears twice (with and without an adapter name)",
                    key_of(layer, t, is_a)
                ),
            ));
        }
    }
    if found.is_empty() {
        return Err(Error::format(path, "the adapter holds no LoRA tensor"));
    }

    // Targets: those listed, or (pattern / exclusions) those the keys show.
    let present: BTreeSet<Target> = found.keys().map(|&(_, t, _)| t).collect();
    let mut spec = peft.spec.clone();
    if !peft.targets_listed {
        spec.targets = present.iter().copied().collect();
    }
    spec.validate()
        .map_err(|e| Error::format(&cfg_path, e.to_string()))?;

    let layers_expected: Vec<usize> = match &peft.layers {
        Some(l) => l.clone(),
        None => (0..n_layers).collect(),
    };
    if let Some(&bad) = layers_expected.iter().find(|&&l| l >= n_layers) {
        return Err(Error::format(
            &cfg_path,
            format!("`layers_to_transform` lists layer {bad}, but this base has {n_layers} layers"),
        ));
    }
    let must_have_all = peft.targets_listed && !peft.has_exclusions;
    let mut layers: Vec<LayerLora<f32>> = (0..n_layers)
        .map(|_| LayerLora {
            pairs: Default::default(),
        })
        .collect();
    for (i, layer) in layers.iter_mut().enumerate() {
        for t in Target::ALL {
            let a = found.remove(&(i, t, true));
            let b = found.remove(&(i, t, false));
            let wanted = must_have_all && spec.targets.contains(&t) && layers_expected.contains(&i);
            match (a, b) {
                (Some(a), Some(b)) => layer.pairs[t.index()] = Some(LoraPair { a, b }),
                (None, None) if !wanted => {}
                (a, b) => {
                    let missing = key_of(i, t, a.is_none());
                    let why = if a.is_some() || b.is_some() {
                        "its other half is present".to_string()
                    } else {
                        format!("{} lists {} for layer {i}", cfg_path.display(), t.name())
                    };
                    return Err(Error::format(
                        path,
                        format!("missing tensor `{missing}` ({why})"),
                    ));
                }
            }
        }
    }
    Ok(Lora { spec, layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_and_without_adapter_name() {
        let k = "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight";
        assert_eq!(parse_key(k), Some((3, Target::DownProj, false)));
        let k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
        assert_eq!(parse_key(k), Some((0, Target::QProj, true)));
        for bad in [
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.lm_head.lora_A.weight",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
        assert_eq!(
            key_of(2, Target::VProj, true),
            "base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"
        );
    }

    #[test]
    fn config_fields_are_checked() {
        let p = Path::new("adapter_config.json");
        let base = adapter_config_json(
            &LoraSpec {
                r: 4,
                alpha: 8.0,
                dropout: 0.05,
                targets: vec![Target::QProj, Target::VProj],
                rslora: true,
            },
            "base",
            None,
        );
        let parsed = parse_peft_config(p, &base).unwrap();
        assert_eq!(parsed.spec.targets, vec![Target::QProj, Target::VProj]);
        assert!(parsed.spec.rslora && parsed.targets_listed);
        assert_eq!(base["lora_alpha"], json!(8));

        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            parse_peft_config(p, &c)
        };
        let all = with("target_modules", json!("all-linear")).unwrap();
        assert_eq!(all.spec.targets, Target::ALL.to_vec());
        let suffix = with("target_modules", json!(["self_attn.k_proj"])).unwrap();
        assert_eq!(suffix.spec.targets, vec![Target::KProj]);
        for (k, v, needle) in [
            ("peft_type", json!("IA3"), "peft_type"),
            ("r", json!(0), "`r`"),
            ("lora_alpha", json!(-1), "lora_alpha"),
            ("use_dora", json!(true), "DoRA"),
            ("target_modules", json!(["lm_head"]), "lm_head"),
            ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
            ("rank_pattern", json!({"q_proj": 8}), "rank_pattern"),
        ] {
            let e = with(k, v).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains("adapter_config.json"),
                "{e}"
            );
        }
    }
}
