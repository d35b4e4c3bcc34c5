//! Writing a tokenizer back as a Hugging Face `tokenizer.json`.

use std::path::Path;

use tokenizers::processors::template::TemplateProcessing;

use super::{tok_err, Tokenizer};
use crate::error::{Error, Result};

impl Tokenizer {
    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (atomically), which
    /// [`Tokenizer::from_hf_folder`] and transformers' `AutoTokenizer` read back.
    ///
    /// When the model wants BOS ([`Tokenizer::add_bos`]) and the tokenizer has no post-processor
    /// (a tokenizer rebuilt from GGUF metadata), one that prepends BOS is added, so
    /// transformers' `encode` adds it as llama.cpp does; retune's own encoding never runs the
    /// post-processor and adds BOS itself.
    pub fn save_tokenizer_json(&self, path: &Path) -> Result<()> {
        let mut inner = self.inner.clone();
        if let (true, Some(bos_id), Some(bos), None) = (
            self.add_bos,
            self.bos_id,
            self.bos_token.as_deref(),
            inner.get_post_processor(),
        ) {
            let bos_piece = format!("{bos}:0");
            let processor = TemplateProcessing::builder()
                .try_single(vec![bos_piece.as_str(), "$A:0"])
                .and_then(|b| {
                    b.try_pair(vec![bos_piece.as_str(), "$A:0", bos_piece.as_str(), "$B:1"])
                })
                .map_err(tok_err)?
                .special_tokens(vec![(bos.to_string(), bos_id)])
                .build()
                .map_err(tok_err)?;
            inner.with_post_processor(Some(processor));
        }
        let text = inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("serialising tokenizer.json: {e}")))?;
        crate::load::save::write_file_atomic(path, text.as_bytes())
    }
}
