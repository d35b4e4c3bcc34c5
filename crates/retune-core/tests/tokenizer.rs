//! Tokenizer and chat-template tests against real assets: llama.cpp's vocab GGUFs and golden
//! vectors, the Llama 3 and Qwen3 tokenizer.json files, SmolLM2-135M-Instruct's GGUF, and
//! llama.cpp's collection of real chat templates.

use std::path::{Path, PathBuf};

use retune_assets::{fetch, Asset};
use retune_core::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use retune_core::Error;

fn vocabs() -> PathBuf {
    fetch(Asset::LlamaCppVocabs).expect("fetching llama.cpp vocabs")
}

fn template(name: &str) -> (String, String) {
    let path = vocabs().join("templates").join(name);
    (
        std::fs::read_to_string(&path).unwrap(),
        path.display().to_string(),
    )
}

fn smollm2() -> Tokenizer {
    Tokenizer::from_gguf(&fetch(Asset::SmolLm2Gguf).unwrap()).unwrap()
}

/// llama.cpp's `test-tokenizer-0` inputs and expected ids for `ggml-vocab-NAME.gguf`: inputs
/// are separated by "\n__ggml_vocab_test__\n" (the file ends with one), and the `.out` file has
/// one line of space-separated ids per input.
fn golden(name: &str) -> Vec<(String, Vec<u32>)> {
    let base = vocabs().join(format!("ggml-vocab-{name}.gguf"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let inputs: Vec<&str> = inp.strip_suffix(sep).unwrap_or(&inp).split(sep).collect();
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{name}: inputs and outputs differ in number"
    );
    inputs.into_iter().map(String::from).zip(outputs).collect()
}

/// Tokenizes every golden input without BOS and returns the failures, one description each.
/// test-tokenizer-0 calls `common_tokenize(ctx, text, add_special = false, parse_special =
/// false)`; `encode` parses special-token text, but no golden input contains any.
fn golden_failures(tok: &Tokenizer, name: &str) -> Vec<String> {
    let cases = golden(name);
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
    }
    eprintln!(
        "{name}: {} of {} golden vectors pass",
        cases.len() - failures.len(),
        cases.len()
    );
    failures
        .into_iter()
        .map(|f| format!("{name}: {f}"))
        .collect()
}

fn gguf_vocab(name: &str) -> Tokenizer {
    Tokenizer::from_gguf(&vocabs().join(format!("ggml-vocab-{name}.gguf"))).unwrap()
}

#[test]
fn golden_vectors_gguf_bpe() {
    let mut failures = Vec::new();
    for name in [
        "llama-bpe",
        "qwen2",
        "qwen35",
        "gpt-2",
        "starcoder",
        "refact",
        "command-r",
        "mpt",
        "falcon",
        "deepseek-llm",
        "deepseek-coder",
    ] {
        failures.extend(golden_failures(&gguf_vocab(name), name));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_vectors_gguf_spm() {
    let mut failures = Vec::new();
    for name in ["llama-spm", "phi-3"] {
        failures.extend(golden_failures(&gguf_vocab(name), name));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_vectors_tokenizer_json() {
    let llama3 = Tokenizer::from_hf_folder(&fetch(Asset::Llama3Tokenizer).unwrap()).unwrap();
    let qwen3 = Tokenizer::from_hf_folder(&fetch(Asset::Qwen3Tokenizer).unwrap()).unwrap();
    let mut failures = golden_failures(&llama3, "llama-bpe");
    failures.extend(golden_failures(&qwen3, "qwen2"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_gguf_tokenizer() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(
        (tok.bos_id, tok.bos_token.as_deref()),
        (Some(1), Some("<|im_start|>"))
    );
    assert_eq!(tok.eos_ids[0], 2, "the declared EOS comes first");
    assert!(tok.is_eos(2) && tok.is_eos(0) && !tok.is_eos(1));
    // SmolLM2 is trained without BOS: add_bos=true adds nothing.
    assert!(!tok.add_bos);
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode_raw("Hello").unwrap()
    );

    // The `smollm` pre-tokenizer splits every digit.
    let digits: Vec<u32> = "1234"
        .chars()
        .map(|c| tok.token_to_id(&c.to_string()).unwrap())
        .collect();
    assert_eq!(tok.encode("1234", false).unwrap(), digits);

    let text = "Atrial fibrillation (AF) ≥ 65 years — naïve patients: CHA₂DS₂-VASc 🫀";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    // Specials written in the text are parsed, and skipped on request when decoding.
    let ids = tok.encode_raw("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn bos_rule() {
    let llama3 = Tokenizer::from_hf_folder(&fetch(Asset::Llama3Tokenizer).unwrap()).unwrap();
    assert!(llama3.add_bos);
    assert_eq!(llama3.bos_id, Some(128000));
    assert_eq!(llama3.encode("Hello", true).unwrap(), vec![128000, 9906]);
    assert_eq!(llama3.encode("Hello", false).unwrap(), vec![9906]);
    // A text that already starts with BOS does not get a second one.
    assert_eq!(
        llama3.encode("<|begin_of_text|>Hello", true).unwrap(),
        vec![128000, 9906]
    );
    assert!(
        llama3.is_eos(128001) && llama3.is_eos(128009),
        "<|end_of_text|> and <|eot_id|> stop"
    );

    // llama.cpp's default for the llama-bpe pre-tokenizer is to add BOS.
    let gguf = gguf_vocab("llama-bpe");
    assert!(gguf.add_bos);
    assert_eq!(gguf.encode("Hello", true).unwrap(), vec![128000, 9906]);

    let qwen3 = Tokenizer::from_hf_folder(&fetch(Asset::Qwen3Tokenizer).unwrap()).unwrap();
    assert_eq!((qwen3.add_bos, qwen3.bos_id), (false, None));
    assert_eq!(qwen3.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(qwen3.is_eos(151645) && qwen3.is_eos(151643));
    assert!(!gguf_vocab("qwen2").add_bos);
}

#[test]
fn load_dispatches_on_folder_or_file() {
    let dir = Tokenizer::load(&fetch(Asset::Llama3Tokenizer).unwrap()).unwrap();
    assert_eq!(dir.vocab_size(), 128256);
    let file = Tokenizer::load(&fetch(Asset::SmolLm2Gguf).unwrap()).unwrap();
    assert_eq!(file.vocab_size(), 49152);
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are a careful cardiology assistant."),
        ChatMessage::new("user", "What is atrial fibrillation?"),
        ChatMessage::new("assistant", "An irregular, often rapid heart rhythm."),
    ]
}

#[test]
fn chat_smollm2_chatml() {
    let tok = smollm2();
    let user = [ChatMessage::new("user", "What is atrial fibrillation?")];
    // Without a system message the template writes SmolLM's default one.
    assert_eq!(
        tok.render_chat(&user, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is atrial fibrillation?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        tok.render_chat(&conversation(), false).unwrap(),
        "<|im_start|>system\nYou are a careful cardiology assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is atrial fibrillation?<|im_end|>\n\
         <|im_start|>assistant\nAn irregular, often rapid heart rhythm.<|im_end|>\n"
    );
    let ids = tok.encode_chat(&user, true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(
        ids.iter().filter(|&&i| i == 1).count(),
        3,
        "three <|im_start|>, no extra BOS"
    );
}

#[test]
fn chat_llama3_tokenizer_config() {
    let tok = Tokenizer::from_hf_folder(&fetch(Asset::Llama3Tokenizer).unwrap()).unwrap();
    // This template always ends with the assistant header, whatever add_generation_prompt says.
    let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                You are a careful cardiology assistant.<|eot_id|>\
                <|start_header_id|>user<|end_header_id|>\n\nWhat is atrial fibrillation?<|eot_id|>\
                <|start_header_id|>assistant<|end_header_id|>\n\nAn irregular, often rapid heart rhythm.<|eot_id|>\
                <|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(tok.render_chat(&conversation(), true).unwrap(), want);
    // The template writes BOS; encode_chat must not add a second one.
    let ids = tok.encode_chat(&conversation(), true).unwrap();
    assert_eq!(ids[0], 128000);
    assert_eq!(ids.iter().filter(|&&i| i == 128000).count(), 1);
    assert_eq!(ids, tok.encode(want, false).unwrap());
}

#[test]
fn chat_llama_cpp_templates() {
    let llama3 = Tokenizer::from_hf_folder(&fetch(Asset::Llama3Tokenizer).unwrap()).unwrap();
    let qwen3 = Tokenizer::from_hf_folder(&fetch(Asset::Qwen3Tokenizer).unwrap()).unwrap();
    let render = |tok: &Tokenizer, name: &str, msgs: &[ChatMessage], agp: bool, now: i64| {
        let mut tok = tok.clone();
        let (text, origin) = template(name);
        tok.set_chat_template(text, origin);
        tok.render_chat_at(msgs, agp, now).unwrap()
    };
    let t_2024 = 1_721_999_109; // 2024-07-26
    let t_2025 = 1_741_942_800; // 2025-03-14

    // Llama 3.1 as llama.cpp ships it: a fixed default date (no strftime_now).
    let llama_tail = "You are a careful cardiology assistant.<|eot_id|>\
        <|start_header_id|>user<|end_header_id|>\n\nWhat is atrial fibrillation?<|eot_id|>\
        <|start_header_id|>assistant<|end_header_id|>\n\nAn irregular, often rapid heart rhythm.<|eot_id|>";
    let header = |date: &str| {
        format!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
        )
    };
    assert_eq!(
        render(
            &llama3,
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
            &conversation(),
            false,
            t_2025
        ),
        header("26 Jul 2024") + llama_tail
    );
    // Llama 3.2 dates the prompt with strftime_now, which render_chat_at pins.
    assert_eq!(
        render(
            &llama3,
            "meta-llama-Llama-3.2-3B-Instruct.jinja",
            &conversation(),
            true,
            t_2025
        ),
        header("14 Mar 2025") + llama_tail + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    );

    assert_eq!(
        render(
            &qwen3,
            "Qwen-Qwen2.5-7B-Instruct.jinja",
            &conversation(),
            false,
            t_2024
        ),
        "<|im_start|>system\nYou are a careful cardiology assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is atrial fibrillation?<|im_end|>\n\
         <|im_start|>assistant\nAn irregular, often rapid heart rhythm.<|im_end|>\n"
    );
    assert_eq!(
        render(&qwen3, "Qwen-Qwen2.5-7B-Instruct.jinja", &conversation()[1..2], true, t_2024),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is atrial fibrillation?<|im_end|>\n<|im_start|>assistant\n"
    );

    // SmolLM3 (defaults to thinking mode; the system text becomes "Custom Instructions").
    assert_eq!(
        render(&smollm2(), "HuggingFaceTB-SmolLM3-3B.jinja", &conversation(), false, t_2024),
        "<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\nReasoning Mode: /think\n\n\
         ## Custom Instructions\n\nYou are a careful cardiology assistant.\n\n<|im_end|>\n\
         <|im_start|>user\nWhat is atrial fibrillation?<|im_end|>\n\
         <|im_start|>assistant\nAn irregular, often rapid heart rhythm.<|im_end|>\n"
    );

    // Qwen3's own template (namespace, reversed slices, Python string methods): the last
    // assistant turn gets an empty think block.
    assert_eq!(
        qwen3.render_chat(&conversation(), false).unwrap(),
        "<|im_start|>system\nYou are a careful cardiology assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is atrial fibrillation?<|im_end|>\n\
         <|im_start|>assistant\n<think>\n\n</think>\n\nAn irregular, often rapid heart rhythm.<|im_end|>\n"
    );
}

#[test]
fn chat_template_errors_name_the_template() {
    // Gemma 2 rejects system messages with raise_exception.
    let mut tok = smollm2();
    let (text, origin) = template("google-gemma-2-2b-it.jinja");
    tok.set_chat_template(text, origin.clone());
    let err = tok
        .render_chat(&conversation(), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&origin) && err.contains("System role not supported"),
        "{err}"
    );

    tok.set_chat_template("{% for m in messages %}{{ m.content }", "broken.jinja");
    let err = tok
        .render_chat(&conversation(), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.jinja") && err.contains("syntax error"),
        "{err}"
    );

    // A GGUF without tokenizer.chat_template: the error says which file has none.
    let spm = gguf_vocab("llama-spm");
    assert!(spm.chat_template.is_none());
    let err = spm
        .render_chat(&conversation(), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no chat template") && err.contains("ggml-vocab-llama-spm.gguf"),
        "{err}"
    );
}

#[test]
fn stream_decoder_rebuilds_text() {
    let text = "Atrial fibrillation ≥ 65 years — naïve 🫀 patients\n  indented";
    let spm = gguf_vocab("llama-spm");
    for tok in [smollm2(), spm] {
        let ids = tok.encode(text, false).unwrap();
        let mut stream = StreamDecoder::new(&tok);
        let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces.concat(), text);
        // The 4-byte emoji spans byte-level tokens: some pushes yield nothing until it completes.
        assert!(pieces.iter().any(String::is_empty), "{pieces:?}");
    }
}

#[test]
fn check_vocab_against_model() {
    let tok = smollm2();
    let path = Path::new("model.gguf");
    tok.check_vocab(49152, path).unwrap();
    tok.check_vocab(49280, path).unwrap(); // a padded embedding is fine
    let err = tok.check_vocab(32000, path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert!(
        msg.contains("model.gguf") && msg.contains("49152") && msg.contains("32000"),
        "{msg}"
    );
}

#[test]
fn bad_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 42}").unwrap();
    match Tokenizer::from_hf_folder(dir.path()) {
        Err(Error::Format { path, reason }) => {
            assert_eq!(path, dir.path().join("tokenizer.json"), "{reason}")
        }
        other => panic!("expected a format error, got {other:?}"),
    }
    let empty = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_folder(empty.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tokenizer.json"), "{err}");
}

/// Writes a GGUF holding only `metadata`.
fn write_gguf(path: &Path, metadata: &[(&str, candle_core::quantized::gguf_file::Value)]) {
    let refs: Vec<(&str, &candle_core::quantized::gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &refs, &[]).unwrap();
}

#[test]
fn bad_gguf_metadata() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-tokenizer.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("llama".into()))],
    );
    match Tokenizer::from_gguf(&path) {
        Err(Error::Format { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains("tokenizer.ggml.model"), "{reason}");
        }
        other => panic!("expected a format error, got {other:?}"),
    }

    let strings =
        |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let path = dir.path().join("odd-pre.gguf");
    write_gguf(
        &path,
        &[
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("klingon".into())),
            ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", strings(&["a b"])),
        ],
    );
    let err = Tokenizer::from_gguf(&path).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("klingon") && msg.contains("smollm") && msg.contains("llama-bpe"),
        "{msg}"
    );

    // A tiny well-formed byte-level vocab loads and merges.
    let path = dir.path().join("tiny.gguf");
    write_gguf(
        &path,
        &[
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
            ("tokenizer.ggml.tokens", strings(&["a", "b", "ab", "<eos>"])),
            (
                "tokenizer.ggml.token_type",
                Value::Array(vec![
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(1),
                    Value::I32(3),
                ]),
            ),
            ("tokenizer.ggml.merges", strings(&["a b"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(3)),
        ],
    );
    let tok = Tokenizer::from_gguf(&path).unwrap();
    assert_eq!(tok.encode("abab<eos>", true).unwrap(), vec![2, 2, 3]);
    assert!(tok.is_eos(3) && tok.bos_id.is_none() && !tok.add_bos);
}

#[test]
fn hf_config_variants() {
    // tokenizer_config.json with AddedToken objects, a list of named templates, add_bos_token,
    // and generation_config.json with a list of EOS ids.
    let dir = tempfile::tempdir().unwrap();
    let src = fetch(Asset::Qwen3Tokenizer).unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": {"content": "<|im_end|>", "special": true},
        "add_bos_token": true,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"},
        ],
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [151645, 151643]}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf_folder(dir.path()).unwrap();
    assert_eq!((tok.bos_id, tok.add_bos), (Some(151644), true));
    assert_eq!(&tok.eos_ids[..2], &[151645, 151643]);
    let msgs = [ChatMessage::new("user", "Hi")];
    assert_eq!(
        tok.render_chat(&msgs, false).unwrap(),
        "<|im_start|>user: Hi\n"
    );
    assert_eq!(
        tok.encode_chat(&msgs, false)
            .unwrap()
            .iter()
            .filter(|&&i| i == 151644)
            .count(),
        1
    );

    // A chat_template.jinja next to the config wins, as in transformers.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ messages[0].content | upper }}",
    )
    .unwrap();
    let tok = Tokenizer::from_hf_folder(dir.path()).unwrap();
    assert_eq!(tok.render_chat(&msgs, false).unwrap(), "HI");

    // A broken config names itself.
    std::fs::write(dir.path().join("tokenizer_config.json"), "{ nope").unwrap();
    match Tokenizer::from_hf_folder(dir.path()) {
        Err(Error::Format { path, .. }) => {
            assert_eq!(path, dir.path().join("tokenizer_config.json"))
        }
        other => panic!("expected a format error, got {other:?}"),
    }
}
