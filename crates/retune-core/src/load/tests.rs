//! Unit tests of `config.json` parsing and the byte decoders (the loaders themselves are tested
//! end to end in `tests/load.rs`).

use std::path::Path;

use serde_json::json;

use super::*;
use crate::config::RopeScaling;

fn parse(v: serde_json::Value) -> Result<LlamaConfig> {
    LlamaConfig::from_hf_json(Path::new("/m/config.json"), &v)
}

/// SmolLM2-135M's config.json as transformers 4.x writes it.
fn smollm2_v4() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "rope_scaling": null,
        "max_position_embeddings": 8192, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        "attention_bias": false, "mlp_bias": false
    })
}

#[test]
fn transformers_4_keys() {
    let c = parse(smollm2_v4()).unwrap();
    assert_eq!(c.param_count(), 134_515_008);
    assert_eq!(
        (c.head_dim, c.rope_theta, c.rms_norm_eps),
        (64, 100000.0, 1e-5)
    );
    assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert!(c.tie_word_embeddings && c.rope_scaling.is_none() && !c.qkv_bias);
}

#[test]
fn transformers_5_keys_equal_4_keys() {
    let mut v = smollm2_v4();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_theta");
    o.remove("rope_scaling");
    o.remove("torch_dtype");
    o.insert("dtype".into(), json!("bfloat16"));
    o.insert(
        "rope_parameters".into(),
        json!({"rope_theta": 100000.0, "rope_type": "default"}),
    );
    assert_eq!(parse(v).unwrap(), parse(smollm2_v4()).unwrap());
}

#[test]
fn llama3_scaling_in_both_spellings() {
    let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let expected = Some(RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let mut v4 = smollm2_v4();
    v4["rope_scaling"] = scaling.clone();
    assert_eq!(parse(v4).unwrap().rope_scaling, expected);

    let mut v5 = smollm2_v4();
    let mut params = scaling;
    params["rope_theta"] = json!(500000.0);
    v5["rope_parameters"] = params;
    let c = parse(v5).unwrap();
    assert_eq!((c.rope_scaling, c.rope_theta), (expected, 500000.0));

    // Old spelling `type`, and a missing parameter.
    let mut v = smollm2_v4();
    v["rope_scaling"] = json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0});
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("/m/config.json") && err.contains("original_max_position_embeddings"),
        "{err}"
    );
}

#[test]
fn other_rope_types_are_unsupported() {
    for (key, kind) in [
        ("rope_scaling", "yarn"),
        ("rope_scaling", "linear"),
        ("rope_parameters", "dynamic"),
    ] {
        let mut v = smollm2_v4();
        v[key] = json!({"rope_type": kind, "factor": 4.0, "rope_theta": 10000.0});
        let err = parse(v).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains(&format!("`{kind}`")), "{err}");
    }
}

#[test]
fn architectures_and_biases() {
    let mut v = smollm2_v4();
    v["architectures"] = json!(["Qwen2ForCausalLM"]);
    v["model_type"] = json!("qwen2");
    let c = parse(v).unwrap();
    assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias), (true, false, false));

    let mut v = smollm2_v4();
    v["attention_bias"] = json!(true);
    v["mlp_bias"] = json!(true);
    let c = parse(v).unwrap();
    assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias), (true, true, true));

    let mut v = smollm2_v4();
    v["architectures"] = json!(["MistralForCausalLM"]);
    v["model_type"] = json!("mistral");
    v.as_object_mut().unwrap().remove("tie_word_embeddings");
    let c = parse(v).unwrap();
    assert_eq!(
        (c.qkv_bias, c.tie_word_embeddings, c.sliding_window),
        (false, false, Some(4096))
    );

    let mut v = smollm2_v4();
    v["architectures"] = json!(["GPT2LMHeadModel"]);
    v["model_type"] = json!("gpt2");
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("GPT2LMHeadModel")
            && err.contains("LlamaForCausalLM")
            && err.contains("Qwen2ForCausalLM"),
        "{err}"
    );
}

#[test]
fn defaults_and_token_lists() {
    let mut v = smollm2_v4();
    let o = v.as_object_mut().unwrap();
    for k in [
        "num_key_value_heads",
        "rope_theta",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
    ] {
        o.remove(k);
    }
    o.insert("eos_token_id".into(), json!([2, 0]));
    o.insert("head_dim".into(), json!(null));
    let c = parse(v).unwrap();
    assert_eq!(c.num_key_value_heads, 9);
    assert_eq!(
        (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings),
        (10000.0, 1e-6, 2048)
    );
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, vec![2, 0]);
}

#[test]
fn missing_and_malformed_fields_name_the_field() {
    for field in ["hidden_size", "vocab_size", "num_hidden_layers"] {
        let mut v = smollm2_v4();
        v.as_object_mut().unwrap().remove(field);
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("/m/config.json") && err.contains(&format!("`{field}`")),
            "{err}"
        );
    }
    let mut v = smollm2_v4();
    v["hidden_size"] = json!("576");
    assert!(parse(v)
        .unwrap_err()
        .to_string()
        .contains("non-negative integer"));
    // Sizes that `validate` rejects come back as a format error on the file.
    let mut v = smollm2_v4();
    v["num_key_value_heads"] = json!(4);
    let err = parse(v).unwrap_err();
    assert!(
        matches!(err, Error::Format { .. }) && err.to_string().contains("multiple"),
        "{err}"
    );
}

#[test]
fn decoders_are_exact() {
    let x = [1.5f32, -0.15625, 65504.0, 0.0];
    let f32_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(f32_from_le(&f32_bytes), x);
    let f16_bytes: Vec<u8> = x
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(f16_from_le(&f16_bytes), x);
    let bf16_bytes: Vec<u8> = [1.5f32, -0.15625, 0.0]
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(bf16_from_le(&bf16_bytes), [1.5, -0.15625, 0.0]);
}
