//! A tokenizer from a Hugging Face folder: `tokenizer.json`, with `tokenizer_config.json`
//! (special tokens, `add_bos_token`, chat template), `chat_template.jinja` and
//! `generation_config.json` where present.

use std::path::Path;

use serde_json::Value as Json;

use super::{eos_list, tok_err, Tokenizer};
use crate::error::{Error, Result};

/// Reads and parses a JSON file that may be absent.
fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// A special token written either as a string or as an AddedToken object (`{"content": ..}`).
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is the chat one.
fn config_template(cfg: &Json) -> Option<String> {
    match cfg.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some(n))
            };
            named("default").and_then(|t| t.get("template")?.as_str().map(str::to_string))
        }
        _ => None,
    }
}

pub(super) fn from_hf_folder(dir: &Path) -> Result<Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::format(dir, "no tokenizer.json in this folder (retune reads the fast-tokenizer file; save one with transformers' `tokenizer.save_pretrained`)"));
    }
    let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
    let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| Error::format(&tok_path, format!("not a valid tokenizer.json: {e}")))?;
    // Lengths are the caller's business: never pad or truncate silently.
    inner.with_padding(None);
    inner.with_truncation(None).map_err(tok_err)?;

    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = read_json(&cfg_path)?.unwrap_or(Json::Null);
    let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);

    // transformers prefers a separate chat_template.jinja over the config's field.
    let jinja_path = dir.join("chat_template.jinja");
    let (chat_template, template_origin) = if jinja_path.exists() {
        let t = std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
        (Some(t), jinja_path.display().to_string())
    } else {
        (
            config_template(&cfg),
            format!("{} (chat_template)", cfg_path.display()),
        )
    };

    let bos_token = token_string(cfg.get("bos_token"));
    let eos_token = token_string(cfg.get("eos_token"));
    let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));

    // EOS: the config's eos_token first, then generation_config's ids, then known end-of-turn specials.
    let mut declared: Vec<u32> = eos_token
        .as_deref()
        .and_then(|t| inner.token_to_id(t))
        .into_iter()
        .collect();
    match gen.get("eos_token_id") {
        Some(Json::Number(n)) => declared.extend(n.as_u64().map(|i| i as u32)),
        Some(Json::Array(a)) => {
            declared.extend(a.iter().filter_map(Json::as_u64).map(|i| i as u32))
        }
        _ => {}
    }
    let added = inner.get_added_tokens_decoder();
    let specials = added
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(&id, t)| (t.content.as_str(), id));
    let eos_ids = eos_list(declared, specials);

    // Does the model want BOS? The config says so explicitly; else tokenizer.json's post-processor
    // adds it; else a chat template that emits `bos_token` shows the model was trained with it.
    let add_bos = bos_id.is_some()
        && match cfg.get("add_bos_token").and_then(Json::as_bool) {
            Some(b) => b,
            None => {
                let with_specials = inner.encode("a", true).map_err(tok_err)?;
                with_specials.get_ids().first() == bos_id.as_ref()
                    || chat_template
                        .as_deref()
                        .is_some_and(|t| t.contains("bos_token"))
            }
        };

    Ok(Tokenizer {
        inner,
        bos_id,
        eos_ids,
        chat_template,
        bos_token,
        eos_token,
        add_bos,
        template_origin,
    })
}
