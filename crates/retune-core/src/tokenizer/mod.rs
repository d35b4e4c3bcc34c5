//! Tokenizers and chat templates.
//!
//! A [`Tokenizer`] comes from a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`)
//! or from a GGUF file's metadata, rebuilt to tokenize exactly as llama.cpp does (checked
//! against llama.cpp's golden vectors). Chat templates render as in transformers
//! ([`Tokenizer::render_chat`]); [`StreamDecoder`] turns generated ids into text as they come.
//!
//! BOS rule: [`Tokenizer::encode`] with `add_bos` prepends BOS only when the model has a BOS token
//! *and* wants it ([`Tokenizer::add_bos`]: Llama 3 yes, SmolLM2 and Qwen no), and never when the
//! text already starts with it, so a chat rendered with `bos_token` never gets a second one.
//!
//! Chat templates see `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and
//! `documents` (none), `raise_exception` and `strftime_now`; [`Tokenizer::render_chat_at`] pins
//! the clock so renders (training data) are reproducible. Not supported: `{% break %}` /
//! `{% continue %}` (minijinja's `loop_controls` feature is off) and `{% generation %}`; maps
//! iterate in key order, not insertion order (`preserve_order` is off).

mod chat;
mod gguf;
mod hf;
mod save;

use std::path::Path;

pub use gguf::SUPPORTED_PRE;

use crate::error::{Error, Result};

/// One turn of a conversation, as chat templates expect it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (templates may know others, e.g. `tool`).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A text tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_id: Option<u32>,
    /// Ids that end generation: the model's EOS first, then end-of-turn tokens (`<|eot_id|>`,
    /// `<|im_end|>`, `<|endoftext|>`, ...) that the vocabulary holds as specials.
    pub eos_ids: Vec<u32>,
    /// The Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
    /// Text of the BOS token (the template's `bos_token`).
    pub bos_token: Option<String>,
    /// Text of the EOS token (the template's `eos_token`).
    pub eos_token: Option<String>,
    /// Whether the model was trained with BOS at the start of every sequence. From
    /// `add_bos_token` (tokenizer_config.json or `tokenizer.ggml.add_bos_token`); when absent,
    /// llama.cpp's default for the GGUF pre-tokenizer (true for Llama 3 and SentencePiece), or for
    /// a folder whether tokenizer.json's post-processor or the chat template adds `bos_token`.
    pub add_bos: bool,
    /// Where the chat template came from, for error messages.
    template_origin: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos_token)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field(
                "chat_template",
                &self.chat_template.as_ref().map(|_| &self.template_origin),
            )
            .finish()
    }
}

/// Texts of special tokens that end a turn, as llama.cpp's end-of-generation detection lists them.
const END_OF_TURN: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|return|>",
    "<|call|>",
];

/// The `declared` EOS ids first, then the `specials` (text, id) whose text ends a turn, in id
/// order; no id twice.
fn eos_list<'a>(
    declared: impl IntoIterator<Item = u32>,
    specials: impl Iterator<Item = (&'a str, u32)>,
) -> Vec<u32> {
    let mut end_of_turn: Vec<u32> = specials
        .filter(|(t, _)| END_OF_TURN.contains(t))
        .map(|(_, id)| id)
        .collect();
    end_of_turn.sort_unstable();
    let mut out = Vec::new();
    for id in declared.into_iter().chain(end_of_turn) {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a Hugging Face folder, with `tokenizer_config.json`
    /// (special tokens, `add_bos_token`, `chat_template` as a string or as a list of named
    /// templates, of which "default"), `chat_template.jinja` and `generation_config.json`
    /// (extra EOS ids) where present.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        hf::from_hf_folder(dir)
    }

    /// Rebuilds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata: byte-level
    /// BPE (`gpt2`, with the pre-tokenizers in [`SUPPORTED_PRE`]) or SentencePiece (`llama`).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        gguf::from_gguf(path)
    }

    /// [`Tokenizer::from_hf_folder`] for a folder, [`Tokenizer::from_gguf`] for a file.
    pub fn load(model_path: &Path) -> Result<Self> {
        if model_path.is_dir() {
            Self::from_hf_folder(model_path)
        } else {
            Self::from_gguf(model_path)
        }
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// One more than the largest id this tokenizer can produce.
    pub fn id_bound(&self) -> usize {
        let added = self
            .inner
            .get_added_tokens_decoder()
            .into_keys()
            .max()
            .map_or(0, |id| id as usize + 1);
        added.max(self.inner.get_vocab_size(false))
    }

    /// Tokenizes `text`, special tokens written in it included; with `add_bos`, prepends BOS
    /// when the model has one and wants it ([`Tokenizer::add_bos`]) and the text does not
    /// already start with it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text)?;
        if let (true, true, Some(bos)) = (add_bos, self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Tokenizes `text` without ever adding BOS; special tokens written in the text (e.g.
    /// `<|im_start|>`) become their ids.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`; with `skip_special`, special (control) tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// Id of a token given its text (as stored in the vocabulary), if there is one.
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// Whether `id` ends generation (one of [`Tokenizer::eos_ids`]).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Replaces the chat template; `origin` names it in error messages (e.g. a file path).
    pub fn set_chat_template(&mut self, template: impl Into<String>, origin: impl Into<String>) {
        self.chat_template = Some(template.into());
        self.template_origin = origin.into();
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template` does;
    /// `strftime_now` reads the current UTC time (see [`Tokenizer::render_chat_at`]).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.render_chat_at(messages, add_generation_prompt, now)
    }

    /// [`Tokenizer::render_chat`] with `strftime_now` fixed at `now_unix` (seconds since the
    /// epoch, UTC), so renders are reproducible.
    pub fn render_chat_at(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        now_unix: i64,
    ) -> Result<String> {
        let Some(source) = &self.chat_template else {
            return Err(Error::Tokenizer(format!(
                "no chat template: {} has none (use raw text, or a model that ships a template)",
                self.template_origin
            )));
        };
        let vars = chat::ChatVars {
            bos_token: self.bos_token.as_deref(),
            eos_token: self.eos_token.as_deref(),
            now_unix,
        };
        chat::render(
            &self.template_origin,
            source,
            messages,
            add_generation_prompt,
            &vars,
        )
    }

    /// Renders `messages` and tokenizes the result with specials parsed; BOS is added only as
    /// [`Tokenizer::encode`] does, so a template that writes `bos_token` gets exactly one.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, true)
    }

    /// Checks that every id this tokenizer produces has a row in a model embedding of
    /// `model_vocab` rows (`path` names the model in the error). A larger, padded embedding is fine.
    pub fn check_vocab(&self, model_vocab: usize, path: &Path) -> Result<()> {
        let n = self.id_bound();
        if n > model_vocab {
            return Err(Error::format(
                path,
                format!("the tokenizer has {n} token ids but the model's embedding has only {model_vocab} rows: tokenizer and weights do not belong together"),
            ));
        }
        Ok(())
    }
}

/// Incremental detokenizer for streaming generation: push ids one at a time and get the text
/// they complete. A character split across byte-level tokens comes out once all its bytes are
/// in; spaces that depend on neighbours (SentencePiece) come out right. Special tokens are
/// skipped.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    /// Ids not yet fully turned into text, after `context` ids already emitted.
    ids: Vec<u32>,
    /// How many leading `ids` are context only (their text was emitted already).
    context: usize,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder with nothing pushed yet.
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            ids: Vec::new(),
            context: 0,
        }
    }

    /// Adds `id`; returns the new complete text (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        // Decode with the already-emitted ids as context, and return what lies beyond their text.
        let before = self.tok.decode(&self.ids[..self.context], true)?;
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() <= before.len() || !text.starts_with(&before) {
            return Ok(String::new());
        }
        let new = text[before.len()..].to_string();
        // The ids just emitted become the context of the next push.
        self.ids.drain(..self.context);
        self.context = self.ids.len();
        Ok(new)
    }
}
