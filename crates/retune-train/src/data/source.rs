//! Data files as a stream of rows with their line numbers: JSON Lines (read line by line, never
//! whole), JSON arrays (read whole, each element's line found), and text files (one row each).
//! Each file's sha256 and size are computed on the way.

use crate::config::DataFormat;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// A row as read, before its format is known.
pub(crate) enum RawRow {
    /// A JSON value (a JSON Lines line or a JSON array element).
    Json(serde_json::Value),
    /// A whole text file.
    Text(String),
}

/// `(field, what is wrong)`.
pub(crate) type Issue = (String, String);

/// How a file holds its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// One JSON value per line.
    Lines,
    /// One JSON array.
    Array,
    /// The file is one text document.
    Whole,
}

/// The size and sha256 of a file read to its end.
pub(crate) struct FileInfo {
    pub bytes: u64,
    pub sha256: String,
}

/// Expands folders into their `.txt`, `.md`, `.jsonl` and `.json` files (recursively, sorted).
pub(crate) fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found);
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "txt" | "md" | "jsonl" | "json"))
        {
            out.push(p);
        }
    }
}

/// The layout of `path`: by extension (`.jsonl`: lines; `.json`: an array, or lines when the
/// file does not start with `[`; `.txt`, `.md`: whole), else by the first byte that is not
/// white space (`[`: array, `{`: lines, anything else: whole text). A forced `text` format
/// reads `.txt`/`.md`/unknown files whole and JSON files as rows with `text`.
pub(crate) fn layout_of(path: &Path) -> std::io::Result<Layout> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "jsonl" => return Ok(Layout::Lines),
        "txt" | "md" => return Ok(Layout::Whole),
        _ => {}
    }
    let mut f = std::fs::File::open(path)?;
    let mut buf = [0u8; 4096];
    let n = f.read(&mut buf)?;
    let first = buf[..n].iter().find(|b| !b.is_ascii_whitespace()).copied();
    Ok(match (ext, first) {
        (_, Some(b'[')) => Layout::Array,
        ("json", _) | (_, Some(b'{')) => Layout::Lines,
        _ => Layout::Whole,
    })
}

/// The format a JSON row looks like, from its keys.
pub(crate) fn detect(v: &serde_json::Value) -> Option<DataFormat> {
    let o = v.as_object()?;
    let has = |k: &str| o.contains_key(k);
    Some(if has("messages") {
        DataFormat::Messages
    } else if has("chosen") || has("rejected") {
        DataFormat::Preference
    } else if has("instruction") || has("output") {
        DataFormat::Alpaca
    } else if has("completion") || has("prompt") {
        DataFormat::PromptCompletion
    } else if has("text") {
        DataFormat::Text
    } else {
        return None;
    })
}

fn json_error(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let what = s.split(" at line ").next().unwrap_or(&s).to_string();
    format!("invalid JSON at column {}: {what}", e.column())
}

/// Calls `f(line, row)` for each row of `path` (1-based lines; 0 for a whole text file) until
/// it returns false. Blank lines are skipped. An unreadable file is an `Err`.
pub(crate) fn for_each_row(
    path: &Path,
    layout: Layout,
    f: &mut dyn FnMut(u64, Result<RawRow, Issue>) -> bool,
) -> std::io::Result<FileInfo> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let file = std::fs::File::open(path)?;
    match layout {
        Layout::Lines => {
            let mut reader = BufReader::with_capacity(1 << 16, file);
            let mut buf = Vec::new();
            let mut line_no = 0u64;
            loop {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf);
                let start = bytes;
                bytes += n as u64;
                line_no += 1;
                let mut line: &[u8] = &buf;
                while let Some((b'\n' | b'\r', rest)) = line.split_last() {
                    line = rest;
                }
                let row = match std::str::from_utf8(line) {
                    Err(e) => Err((
                        String::new(),
                        format!(
                            "invalid UTF-8 at byte {} of the file (byte {} of the line)",
                            start + e.valid_up_to() as u64,
                            e.valid_up_to()
                        ),
                    )),
                    Ok(s) if s.trim().is_empty() => continue,
                    Ok(s) => serde_json::from_str(s)
                        .map(RawRow::Json)
                        .map_err(|e| (String::new(), json_error(&e))),
                };
                if !f(line_no, row) {
                    break;
                }
            }
        }
        Layout::Array | Layout::Whole => {
            let mut data = Vec::new();
            BufReader::new(file).read_to_end(&mut data)?;
            hasher.update(&data);
            bytes = data.len() as u64;
            let line_at = |offset: usize| {
                1 + data[..offset.min(data.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count() as u64
            };
            match std::str::from_utf8(&data) {
                Err(e) => {
                    let at = e.valid_up_to();
                    f(
                        line_at(at),
                        Err((
                            String::new(),
                            format!("invalid UTF-8 at byte {at} of the file"),
                        )),
                    );
                }
                Ok(text) if layout == Layout::Whole => {
                    f(0, Ok(RawRow::Text(text.to_string())));
                }
                Ok(_) => array_rows(&data, &line_at, f),
            }
        }
    }
    Ok(FileInfo {
        bytes,
        sha256: hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    })
}

fn array_rows(
    data: &[u8],
    line_at: &dyn Fn(usize) -> u64,
    f: &mut dyn FnMut(u64, Result<RawRow, Issue>) -> bool,
) {
    let skip_ws = |mut i: usize| {
        while i < data.len() && data[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(0);
    if data.get(i) != Some(&b'[') {
        f(
            line_at(i),
            Err((String::new(), "expected a JSON array `[...]`".into())),
        );
        return;
    }
    i = skip_ws(i + 1);
    if data.get(i) == Some(&b']') {
        return;
    }
    loop {
        let line = line_at(i);
        let mut stream = serde_json::Deserializer::from_slice(&data[i..]).into_iter();
        match stream.next() {
            Some(Ok(v)) => {
                i += stream.byte_offset();
                if !f(line, Ok(RawRow::Json(v))) {
                    return;
                }
            }
            Some(Err(e)) => {
                f(
                    line + e.line() as u64 - 1,
                    Err((String::new(), json_error(&e))),
                );
                return;
            }
            None => {
                f(
                    line,
                    Err((
                        String::new(),
                        "invalid JSON: the array is not closed".into(),
                    )),
                );
                return;
            }
        }
        i = skip_ws(i);
        match data.get(i) {
            Some(b',') => i = skip_ws(i + 1),
            Some(b']') => return,
            _ => {
                f(
                    line_at(i),
                    Err((
                        String::new(),
                        "invalid JSON: expected `,` or `]` after an array element".into(),
                    )),
                );
                return;
            }
        }
    }
}
