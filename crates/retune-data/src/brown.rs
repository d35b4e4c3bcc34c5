//! The Brown corpus (form C, tagged) as plain English text.
//!
//! A Brown file holds paragraphs separated by blank lines, one sentence (or headline) per
//! line, tokens `word/tag` separated by whitespace. [`untag`] drops the tags (splitting each
//! token at its last `/`, since words like `1-1/2` contain one), joins the words with spaces
//! and detokenises lightly: no space before `, . ; : ! ? ' ) ''`, none after `( ``,
//! `` `` `` / `''` become `"`, and a `.` right after a word ending in `.` (`Jr. .`) is dropped. The text keeps one sentence per line and a blank line between
//! paragraphs.

use crate::{io_err, Error, Result};
use std::path::{Path, PathBuf};

/// The Brown text files of `dir` (`c` + genre letter + two digits, e.g. `ca01`), sorted.
pub fn brown_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let b = name.as_bytes();
        if b.len() == 4
            && b[0] == b'c'
            && b[1].is_ascii_lowercase()
            && b[2..].iter().all(u8::is_ascii_digit)
        {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::Source {
            path: dir.to_path_buf(),
            reason: "holds no Brown corpus files (ca01 .. cr09)".into(),
        });
    }
    Ok(files)
}

/// (file id, plain text) for the first `max_files` Brown files of `dir` in sorted order
/// (all of them when `None`).
pub fn brown_text(dir: &Path, max_files: Option<usize>) -> Result<Vec<(String, String)>> {
    let files = brown_files(dir)?;
    let n = max_files.unwrap_or(files.len()).min(files.len());
    files[..n]
        .iter()
        .map(|path| {
            let tagged = std::fs::read_to_string(path).map_err(io_err(path))?;
            let id = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Ok((id, untag(&tagged, path)?))
        })
        .collect()
}

/// Plain text of one tagged Brown file; `path` names it in errors.
pub fn untag(tagged: &str, path: &Path) -> Result<String> {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut sentences: Vec<String> = Vec::new();
    for (i, line) in tagged.lines().enumerate() {
        if line.trim().is_empty() {
            if !sentences.is_empty() {
                paragraphs.push(sentences.join("\n"));
                sentences.clear();
            }
            continue;
        }
        let mut words = Vec::new();
        for token in line.split_whitespace() {
            let Some((word, _tag)) = token.rsplit_once('/') else {
                return Err(Error::Parse {
                    path: path.to_path_buf(),
                    line: i as u64 + 1,
                    reason: format!("token `{token}` is not `word/tag`"),
                });
            };
            words.push(word);
        }
        sentences.push(detokenize(&words));
    }
    if !sentences.is_empty() {
        paragraphs.push(sentences.join("\n"));
    }
    let mut text = paragraphs.join("\n\n");
    text.push('\n');
    Ok(text)
}

/// Joins words with single spaces, except before closing punctuation and after opening
/// brackets and quotes.
pub fn detokenize(words: &[&str]) -> String {
    let mut out = String::new();
    let mut glue_next = true; // no space before the first word
    for &word in words {
        let (text, no_space_before, no_space_after) = match word {
            "``" => ("\"", false, true),
            "''" => ("\"", true, false),
            "," | "." | ";" | ":" | "!" | "?" | "'" | ")" => (word, true, false),
            "(" => (word, false, true),
            _ => (word, false, false),
        };
        // "Jr." followed by the sentence's "." reads "Jr.".
        if word == "." && out.ends_with('.') {
            continue;
        }
        if !(glue_next || no_space_before) {
            out.push(' ');
        }
        out.push_str(text);
        glue_next = no_space_after;
    }
    out
}

/// Whitespace-separated words of a text.
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}
