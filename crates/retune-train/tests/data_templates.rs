//! Chat rendering for training equals what `retune generate --chat` feeds the model, on real
//! templates (SmolLM2's own, llama.cpp's Llama 3.1 / 3.2 and Qwen2.5 copies); assistant turns,
//! end-of-turn token included, are the only targets; weight 0 turns are left out.
//!
//! The real assets are fetched (pinned by sha256) on first use.

use retune_assets::{fetch, Asset};
use retune_core::tokenizer::{ChatMessage, Tokenizer};
use retune_train::config::{DataFormat, ObjectiveKind};
use retune_train::data::{
    check_files, read_examples, read_preference, Overflow, ReadOptions, CHAT_TIME,
};
use std::path::{Path, PathBuf};

fn smollm2() -> Tokenizer {
    Tokenizer::load(&fetch(Asset::SmolLm2Gguf).unwrap()).unwrap()
}

fn with_template(tokenizer: Asset, template: &str) -> Tokenizer {
    let mut tok = Tokenizer::load(&fetch(tokenizer).unwrap()).unwrap();
    let path = fetch(Asset::LlamaCppVocabs)
        .unwrap()
        .join("templates")
        .join(template);
    tok.set_chat_template(
        std::fs::read_to_string(&path).unwrap(),
        path.display().to_string(),
    );
    tok
}

fn templates() -> Vec<(&'static str, Tokenizer)> {
    vec![
        ("SmolLM2 (GGUF)", smollm2()),
        (
            "Llama 3.1",
            with_template(
                Asset::Llama3Tokenizer,
                "meta-llama-Llama-3.1-8B-Instruct.jinja",
            ),
        ),
        (
            "Llama 3.2",
            with_template(
                Asset::Llama3Tokenizer,
                "meta-llama-Llama-3.2-3B-Instruct.jinja",
            ),
        ),
        (
            "Qwen2.5",
            with_template(Asset::Qwen3Tokenizer, "Qwen-Qwen2.5-7B-Instruct.jinja"),
        ),
    ]
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You answer in one sentence."),
        ChatMessage::new("user", "What does the mitral valve do?"),
        ChatMessage::new(
            "assistant",
            "It keeps blood from flowing back into the left atrium.",
        ),
        ChatMessage::new("user", "And the aortic valve?"),
        ChatMessage::new(
            "assistant",
            "It keeps blood from flowing back into the heart.",
        ),
    ]
}

fn write_rows(dir: &Path, rows: &[serde_json::Value]) -> PathBuf {
    let path = dir.join("chat.jsonl");
    let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}

fn sft(format: DataFormat) -> ReadOptions {
    ReadOptions {
        format,
        objective: Some(ObjectiveKind::Sft),
        max_seq_len: 4096,
        on_overflow: Overflow::Error,
        train_on_prompt: false,
    }
}

/// The ids `retune generate --chat` builds for `messages` (its `encode_prompt` calls
/// `encode_chat(messages, true)`); templates that read the clock read [`CHAT_TIME`] here.
fn generate_ids(tok: &Tokenizer, messages: &[ChatMessage]) -> Vec<u32> {
    let now_sensitive = tok
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("strftime_now"));
    if now_sensitive {
        tok.encode(
            &tok.render_chat_at(messages, true, CHAT_TIME).unwrap(),
            true,
        )
        .unwrap()
    } else {
        tok.encode_chat(messages, true).unwrap()
    }
}

#[test]
fn training_rendering_equals_generate_chat_and_only_replies_are_targets() {
    let dir = tempfile::tempdir().unwrap();
    let conv = conversation();
    let path = write_rows(
        dir.path(),
        &[serde_json::json!({ "messages": conv.clone() })],
    );
    for (name, tok) in templates() {
        let (examples, stats) =
            read_examples(std::slice::from_ref(&path), &tok, &sft(DataFormat::Auto))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(stats[0].format, "messages");
        assert!(
            stats[0].warnings.is_empty(),
            "{name}: {:?}",
            stats[0].warnings
        );
        let ex = &examples[0];
        // The whole conversation is what the template renders for it.
        assert_eq!(
            ex.ids,
            tok.encode(&tok.render_chat_at(&conv, false, CHAT_TIME).unwrap(), true)
                .unwrap(),
            "{name}"
        );
        let mut spans = Vec::new();
        for k in [2, 4] {
            // Inference: the conversation up to the reply, with the generation prompt.
            let prompt = generate_ids(&tok, &conv[..k]);
            assert!(
                ex.ids.starts_with(&prompt),
                "{name}: generate --chat's prompt for turn {k} is not a prefix of the training ids"
            );
            assert!(!ex.is_target[prompt.len() - 1], "{name}");
            let end = tok
                .encode(
                    &tok.render_chat_at(&conv[..=k], false, CHAT_TIME).unwrap(),
                    true,
                )
                .unwrap()
                .len();
            let span = prompt.len()..end;
            assert!(ex.is_target[span.clone()].iter().all(|&t| t), "{name}");
            // The reply's text and the end-of-turn token are in the loss.
            let text = tok.decode(&ex.ids[span.clone()], false).unwrap();
            assert!(text.contains(&conv[k].content), "{name}: {text:?}");
            assert!(
                ex.ids[span.clone()].iter().any(|&id| tok.is_eos(id)),
                "{name}: no end-of-turn token in {text:?}"
            );
            spans.push(span);
        }
        let targets = ex.is_target.iter().filter(|&&t| t).count();
        assert_eq!(
            targets,
            spans.iter().map(|s| s.len()).sum::<usize>(),
            "{name}"
        );
        assert_eq!(stats[0].target_tokens, targets);
    }
}

#[test]
fn weight_zero_turns_and_train_on_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let conv = conversation();
    let mut row = serde_json::json!({ "messages": conv.clone() });
    row["messages"][2]["weight"] = 0.into();
    let path = write_rows(dir.path(), &[row]);
    let tok = smollm2();
    let (ex, _) = read_examples(
        std::slice::from_ref(&path),
        &tok,
        &sft(DataFormat::Messages),
    )
    .unwrap();
    let first_end = tok
        .encode(
            &tok.render_chat_at(&conv[..3], false, CHAT_TIME).unwrap(),
            true,
        )
        .unwrap()
        .len();
    assert!(ex[0].is_target[..first_end].iter().all(|&t| !t));
    let second_start = generate_ids(&tok, &conv[..4]).len();
    assert!(ex[0].is_target[second_start..].iter().all(|&t| t));

    let mut o = sft(DataFormat::Messages);
    o.train_on_prompt = true;
    let (all, _) = read_examples(&[path], &tok, &o).unwrap();
    // Everything but the first token and the weight-0 turn.
    let second_turn_start = generate_ids(&tok, &conv[..2]).len();
    for (i, &t) in all[0].is_target.iter().enumerate() {
        let in_zero_turn = (second_turn_start..first_end).contains(&i);
        assert_eq!(t, i > 0 && !in_zero_turn, "token {i}");
    }
}

#[test]
fn alpaca_and_preference_use_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let tok = smollm2();
    let path = dir.path().join("alpaca.jsonl");
    std::fs::write(
        &path,
        r#"{"instruction": "Summarise.", "input": "The heart pumps blood.", "output": "It pumps."}"#,
    )
    .unwrap();
    let (ex, _) = read_examples(&[path], &tok, &sft(DataFormat::Auto)).unwrap();
    let prompt = tok
        .encode_chat(
            &[ChatMessage::new(
                "user",
                "Summarise.\n\nThe heart pumps blood.",
            )],
            true,
        )
        .unwrap();
    assert!(ex[0].ids.starts_with(&prompt));
    assert!(ex[0].is_target[prompt.len()..].iter().all(|&t| t));
    assert!(ex[0].is_target[..prompt.len()].iter().all(|&t| !t));

    let pref = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/data/good_preference.jsonl");
    let mut o = sft(DataFormat::Auto);
    o.objective = Some(ObjectiveKind::Dpo);
    let (prefs, stats) = read_preference(&[pref], &tok, &o).unwrap();
    assert_eq!(prefs.len(), 2);
    assert_eq!(stats[0].format, "preference");
    let chat = &prefs[1];
    assert_eq!(
        chat.prompt_ids,
        tok.encode_chat(&[ChatMessage::new("user", "Define angina.")], true)
            .unwrap()
    );
    assert!(chat.chosen_ids.iter().any(|&i| tok.is_eos(i)));
    assert_ne!(chat.chosen_ids, chat.rejected_ids);
    let plain = &prefs[0];
    assert!(tok.is_eos(*plain.chosen_ids.last().unwrap()));
}

#[test]
fn a_template_without_end_of_turn_is_warned_about_and_an_inconsistent_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_rows(
        dir.path(),
        &[serde_json::json!({ "messages": conversation() })],
    );
    let mut tok = smollm2();
    // A template that writes no end-of-turn token after replies.
    tok.set_chat_template(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant:{% endif %}",
        "test-no-eot",
    );
    let report = check_files(
        std::slice::from_ref(&path),
        Some(&tok),
        &sft(DataFormat::Auto),
    );
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(
        report.warnings["assistant turns with no end-of-turn/EOS token in the loss"],
        2
    );
    // A template that renders the last message differently is not prefix-consistent.
    tok.set_chat_template(
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        "test-inconsistent",
    );
    let report = check_files(&[path], Some(&tok), &sft(DataFormat::Auto));
    assert_eq!(report.problems.len(), 1);
    let p = &report.problems[0];
    assert_eq!((p.line, p.field.as_str()), (1, "messages[2]"));
    assert!(p.message.contains("chat template"), "{}", p.message);
    assert!(p.message.contains("prefix"), "{}", p.message);
}
