//! `index.html`: the model card, the two plots and the configuration on one self-contained page
//! (inline CSS, inline SVG, no script, no external resource).

use crate::record::DisclosureRecord;
use crate::render::escape;

/// A tiny Markdown to HTML for what the model card uses: front matter (shown as a `<pre>`),
/// headings, paragraphs, tables and `code`. All text is escaped.
pub fn markdown_to_html(md: &str) -> String {
    let mut out = String::new();
    let mut lines = md.lines().peekable();
    if md.starts_with("---\n") {
        lines.next();
        let mut front = Vec::new();
        for l in lines.by_ref() {
            if l == "---" {
                break;
            }
            front.push(l);
        }
        out.push_str(&format!(
            "<pre class=\"front\">{}</pre>\n",
            escape(&front.join("\n"))
        ));
    }
    let mut para: Vec<&str> = Vec::new();
    let flush = |para: &mut Vec<&str>, out: &mut String| {
        if !para.is_empty() {
            out.push_str(&format!("<p>{}</p>\n", inline(&para.join(" "))));
            para.clear();
        }
    };
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.is_empty() {
            flush(&mut para, &mut out);
        } else if let Some(h) = t.strip_prefix("## ") {
            flush(&mut para, &mut out);
            out.push_str(&format!("<h2>{}</h2>\n", inline(h)));
        } else if let Some(h) = t.strip_prefix("# ") {
            flush(&mut para, &mut out);
            out.push_str(&format!("<h1>{}</h1>\n", inline(h)));
        } else if t.starts_with('|') {
            flush(&mut para, &mut out);
            let mut rows = vec![t];
            while let Some(next) = lines.peek() {
                if next.trim().starts_with('|') {
                    rows.push(next.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            out.push_str("<table>\n");
            for (i, row) in rows.iter().enumerate() {
                if i == 1 && row.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ')) {
                    continue;
                }
                let tag = if i == 0 { "th" } else { "td" };
                let cells = split_cells(row);
                out.push_str("<tr>");
                for c in cells {
                    out.push_str(&format!("<{tag}>{}</{tag}>", inline(&c)));
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</table>\n");
        } else {
            para.push(t);
        }
    }
    flush(&mut para, &mut out);
    out
}

/// Cells of a `| a | b |` row; `\|` is a literal bar.
fn split_cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                cells.last_mut().expect("one cell at least").push('|');
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().expect("one cell at least").push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_string()).collect()
}

/// Escapes text, turning `code` spans into `<code>`.
fn inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("<code>{}</code>", escape(part)));
        } else {
            out.push_str(&escape(part));
        }
    }
    out
}

/// The page: title, status, card, plots (inlined SVG), configuration.
pub fn index_html(
    record: &DisclosureRecord,
    card_md: &str,
    loss_svg: &str,
    retention_svg: &str,
    config_text: &str,
) -> String {
    let title = format!("retune run: {}", record.base_model.name);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n\
<style>\n\
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}\n\
table {{ border-collapse: collapse; margin: 1rem 0; }}\n\
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; font-size: 0.9rem; }}\n\
pre {{ background: #f6f6f6; padding: 0.75rem; overflow-x: auto; }}\n\
code {{ font-size: 0.85rem; word-break: break-all; }}\n\
.status {{ font-weight: bold; }} .failed {{ color: #b00; }} .finished {{ color: #070; }}\n\
.plots svg {{ max-width: 100%; height: auto; }}\n\
</style>\n</head>\n<body>\n\
<p class=\"status {status}\">Status: {status}{error}</p>\n\
<section class=\"card\">\n{card}</section>\n\
<section class=\"plots\">\n<h2>Plots</h2>\n{loss}\n{ret}\n<p>Also as <a href=\"loss.svg\">loss.svg</a> and <a href=\"retention.svg\">retention.svg</a>; \
the record as <a href=\"disclosure.json\">JSON</a>, <a href=\"disclosure.jsonld\">JSON-LD</a> and <a href=\"disclosure.jats.xml\">JATS</a>.</p>\n</section>\n\
<section class=\"config\">\n<h2>Configuration</h2>\n<pre>{config}</pre>\n</section>\n</body>\n</html>\n",
        title = escape(&title),
        status = record.status.as_str(),
        error = record
            .error
            .as_deref()
            .map_or_else(String::new, |e| format!(": {}", escape(e))),
        card = markdown_to_html(card_md),
        loss = loss_svg,
        ret = retention_svg,
        config = escape(config_text),
    )
}
