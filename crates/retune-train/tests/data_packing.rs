//! Packing is exact: the same examples packed several to a row (block-diagonal attention,
//! positions restarting) or one to a padded row give the same loss for every example, on a
//! tiny random model in f64.

use retune_core::config::LlamaConfig;
use retune_core::model::Model;
use retune_core::ops::cross_entropy::IGNORE;
use retune_train::data::{batch_of, pack, Example, Row};

fn tiny() -> LlamaConfig {
    LlamaConfig {
        architecture: "LlamaForCausalLM".into(),
        model_type: "llama".into(),
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: None,
        sliding_window: None,
    }
}

/// Example `i`: a prompt of `p` tokens then a completion of `c` tokens ending in EOS (2).
fn example(i: u32, p: usize, c: usize) -> Example {
    let mut ids = vec![1];
    ids.extend((0..p + c - 2).map(|j| 3 + (i * 7 + j as u32 * 5) % 29));
    ids.push(2);
    let is_target = (0..ids.len()).map(|j| j >= p).collect();
    Example {
        ids,
        is_target,
        hash: format!("{i:032x}"),
    }
}

/// Loss sum and count of the tokens of segment `seg` in `row` (other targets ignored).
fn segment_loss(model: &Model<f64>, row: &Row, seg: Option<u32>) -> (f64, usize) {
    let mut only = row.clone();
    if let Some(seg) = seg {
        for (t, &s) in only.targets.iter_mut().zip(&row.segments) {
            if s != seg {
                *t = IGNORE;
            }
        }
    }
    let s = model.loss(&batch_of(&[&only]), None);
    (s.loss_sum, s.count)
}

#[test]
fn packed_and_padded_rows_give_the_same_loss_per_example() {
    let model = Model::<f64>::random(tiny(), 7, 0.3).unwrap();
    let examples: Vec<Example> = [(3, 4), (2, 6), (5, 2), (1, 9), (4, 4), (2, 3)]
        .iter()
        .enumerate()
        .map(|(i, &(p, c))| example(i as u32, p, c))
        .collect();
    let t = 24;
    let packed = pack(&examples, t, true, 0);
    let padded = pack(&examples, t, false, 0);
    assert!(packed.len() < padded.len());
    assert_eq!(padded.len(), examples.len());

    // Each example's own loss, alone in a padded row.
    let alone: Vec<(f64, usize)> = padded
        .iter()
        .map(|r| segment_loss(&model, r, None))
        .collect();
    // The same example inside a packed row: walk the rows, segment by segment.
    let mut k = 0;
    for row in &packed {
        let segments: std::collections::BTreeSet<u32> = row.segments.iter().copied().collect();
        for seg in segments {
            let len = row.segments.iter().filter(|&&s| s == seg).count();
            if row.ids[row.segments.iter().position(|&s| s == seg).unwrap()] == 0 {
                continue; // padding
            }
            assert_eq!(len, examples[k].ids.len());
            let (loss, count) = segment_loss(&model, row, Some(seg));
            assert_eq!(count, alone[k].1, "example {k}");
            assert!(
                (loss - alone[k].0).abs() < 1e-10,
                "example {k}: packed {loss} vs alone {}",
                alone[k].0
            );
            k += 1;
        }
    }
    assert_eq!(k, examples.len());

    // And the whole: one batch of packed rows vs one batch of padded rows.
    let total = |rows: &[Row]| {
        let refs: Vec<&Row> = rows.iter().collect();
        let s = model.loss(&batch_of(&refs), None);
        (s.loss_sum, s.count)
    };
    let (a, na) = total(&packed);
    let (b, nb) = total(&padded);
    assert_eq!(na, nb);
    assert!((a - b).abs() < 1e-10, "{a} vs {b}");
}
