//! The record in four forms: JSON, JSON-LD (schema.org), a JATS methods section and a Hugging
//! Face model card (Markdown). Every renderer reads only the record, so `retune disclose` can
//! re-render from `disclosure.json` alone.

use crate::record::{DisclosureRecord, FileHash};
use serde_json::{json, Value};

/// The CASRAI dictionary term naming the method.
pub const CASRAI_FINE_TUNING: &str = "https://casrai.org/dictionary/term/fine-tuning";

/// The record as pretty-printed JSON.
pub fn to_json(record: &DisclosureRecord) -> String {
    // Invariant: the record holds only strings, numbers, maps with string keys and options.
    serde_json::to_string_pretty(record).expect("a disclosure record always serialises")
}

fn sha_value(sha256: &str) -> Value {
    json!({ "@type": "PropertyValue", "propertyID": "sha256", "value": sha256 })
}

fn file_node(f: &FileHash) -> Value {
    json!({
        "@type": "MediaObject",
        "name": file_name(&f.path),
        "contentUrl": f.path,
        "contentSize": format!("{} B", f.bytes),
        "sha256": f.sha256,
        "identifier": sha_value(&f.sha256),
    })
}

fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
}

/// The record as JSON-LD: a `@graph` of schema.org nodes: the software (retune), the base
/// model, each data file (Dataset), the fine-tuning (an Action typed with the CASRAI term) and
/// its result (the adapter or model, `isBasedOn` the base model).
pub fn to_jsonld(record: &DisclosureRecord) -> String {
    let r = record;
    let software = json!({
        "@id": "#retune",
        "@type": "SoftwareApplication",
        "name": "retune",
        "softwareVersion": r.retune.version,
        "identifier": { "@type": "PropertyValue", "propertyID": "git-commit", "value": r.retune.commit },
        "applicationCategory": "Machine learning",
    });
    let mut base_ids: Vec<Value> = r
        .base_model
        .files
        .iter()
        .map(|f| sha_value(&f.sha256))
        .collect();
    if let Some(t) = &r.base_model.tokenizer_sha256 {
        base_ids.push(
            json!({ "@type": "PropertyValue", "propertyID": "tokenizer-sha256", "value": t }),
        );
    }
    if let Some(t) = &r.base_model.chat_template_sha256 {
        base_ids.push(
            json!({ "@type": "PropertyValue", "propertyID": "chat-template-sha256", "value": t }),
        );
    }
    let base = json!({
        "@id": "#base-model",
        "@type": "CreativeWork",
        "additionalType": "https://schema.org/SoftwareSourceCode",
        "name": r.base_model.name,
        "url": r.base_model.path,
        "encodingFormat": r.base_model.format,
        "description": format!(
            "{} ({} parameters)",
            r.base_model.architecture.as_deref().unwrap_or("unknown architecture"),
            r.base_model.parameters.map_or("unknown".into(), |p| p.to_string())
        ),
        "identifier": base_ids,
        "hasPart": r.base_model.files.iter().map(file_node).collect::<Vec<_>>(),
    });
    let datasets: Vec<Value> = r
        .data
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut node = json!({
                "@id": format!("#data-{i}"),
                "@type": "Dataset",
                "name": file_name(&f.path),
                "url": f.path,
                "encodingFormat": f.format,
                "description": format!("{} data", f.role),
                "keywords": [f.role],
            });
            if let Some(sha) = &f.sha256 {
                node["identifier"] = sha_value(sha);
                node["sha256"] = json!(sha);
            }
            if let Some(b) = f.bytes {
                node["contentSize"] = json!(format!("{b} B"));
            }
            node
        })
        .collect();
    let method_term = json!({
        "@type": "DefinedTerm",
        "@id": CASRAI_FINE_TUNING,
        "name": "Fine-tuning",
        "alternateName": "Model adaptation",
        "url": CASRAI_FINE_TUNING,
        "inDefinedTermSet": "https://casrai.org/dictionary/",
    });
    let output_kind = if r.method.kind == "lora" {
        "LoRA adapter"
    } else {
        "fine-tuned model"
    };
    let mut product = json!({
        "@id": "#output",
        "@type": "CreativeWork",
        "name": format!("{} {}", r.base_model.name, output_kind),
        "about": method_term.clone(),
        "additionalType": CASRAI_FINE_TUNING,
        "isBasedOn": { "@id": "#base-model" },
        "creativeWorkStatus": r.status.as_str(),
        "dateCreated": r.created,
        "hasPart": r.outputs.files.iter().map(file_node).collect::<Vec<_>>(),
    });
    if let Some(dir) = &r.outputs.dir {
        product["url"] = json!(dir);
    }
    let mut params: Vec<Value> = Vec::new();
    for (k, v) in hyper_parameters(r) {
        params.push(json!({ "@type": "PropertyValue", "name": k, "value": v }));
    }
    let action = json!({
        "@id": "#fine-tuning",
        "@type": "CreateAction",
        "name": "Fine-tuning",
        "alternateName": "Model adaptation",
        "additionalType": CASRAI_FINE_TUNING,
        "about": method_term,
        "instrument": { "@id": "#retune" },
        "object": std::iter::once(json!({ "@id": "#base-model" }))
            .chain((0..r.data.files.len()).map(|i| json!({ "@id": format!("#data-{i}") })))
            .collect::<Vec<_>>(),
        "result": { "@id": "#output" },
        "actionStatus": match r.status {
            crate::record::Status::Finished => "https://schema.org/CompletedActionStatus",
            crate::record::Status::Failed => "https://schema.org/FailedActionStatus",
            crate::record::Status::Running => "https://schema.org/ActiveActionStatus",
        },
        "error": r.error,
        "additionalProperty": params,
    });
    let mut graph = vec![software, base];
    graph.extend(datasets);
    graph.push(product);
    graph.push(action);
    // schema.org as the vocabulary; `sha256` is our one extra term, mapped to `identifier`.
    let doc = json!({
        "@context": [
            "https://schema.org/",
            { "sha256": { "@id": "https://schema.org/identifier" } }
        ],
        "@graph": graph,
    });
    serde_json::to_string_pretty(&doc).expect("JSON values always serialise")
}

fn fmt_num(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(fmt_num).collect::<Vec<_>>().join(", "),
        Value::Null => "none".into(),
        other => other.to_string(),
    }
}

/// Every hyper-parameter as `(section.key, value)`, from the embedded configuration (paths
/// left out: they are listed with their hashes).
pub fn hyper_parameters(record: &DisclosureRecord) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Value::Object(sections) = &record.method.config {
        for (section, keys) in sections {
            if section == "output" {
                continue;
            }
            if let Value::Object(keys) = keys {
                for (k, v) in keys {
                    let is_path = (section == "model" && k == "path")
                        || (section == "data" && (k == "train" || k == "eval"))
                        || (section == "retention" && k == "data");
                    if !is_path {
                        out.push((format!("{section}.{k}"), fmt_num(v)));
                    }
                }
            }
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 forbids are dropped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

/// Escapes text for XML and HTML.
pub fn escape(s: &str) -> String {
    xml_escape(s)
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn pct(x: f64) -> String {
    format!("{}{:.1}%", if x >= 0.0 { "+" } else { "" }, x * 100.0)
}

/// The plain account of the run, one paragraph of sentences: what was fine-tuned, how, on
/// what, for how long, and what changed.
pub fn summary_sentences(r: &DisclosureRecord) -> Vec<String> {
    let mut s = Vec::new();
    let base_sha = r
        .base_model
        .files
        .iter()
        .map(|f| f.sha256.as_str())
        .collect::<Vec<_>>();
    let base = if base_sha.is_empty() {
        r.base_model.name.clone()
    } else {
        format!("{} (sha256 {})", r.base_model.name, base_sha.join(", "))
    };
    let how = match &r.method.lora {
        Some(l) => format!(
            "with LoRA (r = {}, alpha = {}, dropout = {}, targets {}{})",
            l.r,
            l.alpha,
            l.dropout,
            l.targets.join(", "),
            if l.rslora { ", rsLoRA" } else { "" }
        ),
        None => "with full fine-tuning".to_string(),
    };
    let train: Vec<&crate::record::DataFile> =
        r.data.files.iter().filter(|f| f.role == "train").collect();
    let names = train
        .iter()
        .map(|f| file_name(&f.path))
        .collect::<Vec<_>>()
        .join(", ");
    let what = match (r.data.train_examples, r.data.tokens_trained) {
        (Some(n), Some(t)) => format!("{n} examples ({t} tokens)"),
        (Some(n), None) => format!("{n} examples"),
        (None, Some(t)) => format!("{t} tokens"),
        (None, None) => "data".to_string(),
    };
    let steps = r
        .results
        .steps
        .map_or_else(String::new, |n| format!(" for {n} steps"));
    let verb = match r.status {
        crate::record::Status::Finished => "We fine-tuned",
        crate::record::Status::Failed => "We attempted to fine-tune",
        crate::record::Status::Running => "We are fine-tuning",
    };
    let mut first = format!(
        "{verb} {base} {how}, objective {}, on {what} from {names}{steps}",
        r.method.objective.kind
    );
    if let (Some(b), Some(a)) = (&r.results.eval_before, &r.results.eval_after) {
        first.push_str(&format!(
            "; eval perplexity went from {:.3} to {:.3}",
            b.perplexity, a.perplexity
        ));
    } else if let Some(a) = &r.results.eval_after {
        first.push_str(&format!(
            "; eval perplexity at the end was {:.3}",
            a.perplexity
        ));
    }
    let preference = |e: &Option<crate::record::EvalResult>| e.as_ref().and_then(|e| e.preference);
    if let (Some(b), Some(a)) = (
        preference(&r.results.eval_before),
        preference(&r.results.eval_after),
    ) {
        first.push_str(&format!(
            "; on {} held-out pairs the reward accuracy went from {:.3} to {:.3} and the reward \
             margin from {:.3} to {:.3}",
            a.pairs,
            b.rewards_accuracies,
            a.rewards_accuracies,
            b.rewards_margins,
            a.rewards_margins
        ));
    }
    if let Some(ret) = &r.results.retention {
        if let (Some(b), Some(a)) = (ret.before, ret.after) {
            first.push_str(&format!(
                "; general-text perplexity went from {b:.3} to {a:.3} ({})",
                pct(a / b - 1.0)
            ));
        }
    }
    first.push('.');
    s.push(first);
    if let Some(e) = &r.error {
        s.push(format!("The run failed: {e}."));
    }
    s.push(format!(
        "Seed {}, {}; retune {} (commit {}) on {} ({}, {} threads).",
        r.method.seed,
        if r.method.deterministic {
            "deterministic"
        } else {
            "not deterministic"
        },
        r.retune.version,
        r.retune.commit,
        r.environment
            .cpu_model
            .as_deref()
            .unwrap_or(&r.environment.arch),
        r.environment.os,
        r.environment.threads
    ));
    s
}

/// `(label, value)` rows of checksums: base files, tokenizer, chat template, data, outputs.
pub fn hash_rows(r: &DisclosureRecord) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for f in &r.base_model.files {
        rows.push((
            format!("base model {}", file_name(&f.path)),
            f.sha256.clone(),
        ));
    }
    if let Some(t) = &r.base_model.tokenizer_sha256 {
        rows.push(("tokenizer".into(), t.clone()));
    }
    if let Some(t) = &r.base_model.chat_template_sha256 {
        rows.push(("chat template".into(), t.clone()));
    }
    for f in &r.data.files {
        if let Some(sha) = &f.sha256 {
            rows.push((
                format!("{} data {}", f.role, file_name(&f.path)),
                sha.clone(),
            ));
        }
    }
    for f in &r.outputs.files {
        rows.push((format!("output {}", f.path), f.sha256.clone()));
    }
    rows
}

/// The record as a JATS `<sec sec-type="methods">` a journal can paste into a methods section.
pub fn to_jats(record: &DisclosureRecord) -> String {
    let r = record;
    let mut x = String::new();
    x.push_str("<sec sec-type=\"methods\" id=\"retune-fine-tuning\">\n");
    x.push_str("  <title>Fine-tuning</title>\n");
    for p in summary_sentences(r) {
        x.push_str(&format!("  <p>{}</p>\n", xml_escape(&p)));
    }
    x.push_str(&format!(
        "  <p>Method: <ext-link ext-link-type=\"uri\" xlink:href=\"{CASRAI_FINE_TUNING}\" xmlns:xlink=\"http://www.w3.org/1999/xlink\">fine-tuning (model adaptation)</ext-link>; data split: {}.</p>\n",
        xml_escape(&r.data.split)
    ));
    x.push_str("  <table-wrap id=\"retune-hyperparameters\">\n");
    x.push_str("    <caption><p>Hyper-parameters of the fine-tuning run.</p></caption>\n");
    x.push_str("    <table>\n      <thead><tr><th>Parameter</th><th>Value</th></tr></thead>\n      <tbody>\n");
    for (k, v) in hyper_parameters(r) {
        x.push_str(&format!(
            "        <tr><td>{}</td><td>{}</td></tr>\n",
            xml_escape(&k),
            xml_escape(&v)
        ));
    }
    x.push_str("      </tbody>\n    </table>\n  </table-wrap>\n");
    x.push_str("  <table-wrap id=\"retune-checksums\">\n");
    x.push_str("    <caption><p>SHA-256 checksums of the files used and produced.</p></caption>\n");
    x.push_str(
        "    <table>\n      <thead><tr><th>File</th><th>SHA-256</th></tr></thead>\n      <tbody>\n",
    );
    for (k, v) in hash_rows(r) {
        x.push_str(&format!(
            "        <tr><td>{}</td><td><monospace>{}</monospace></td></tr>\n",
            xml_escape(&k),
            xml_escape(&v)
        ));
    }
    x.push_str("      </tbody>\n    </table>\n  </table-wrap>\n");
    x.push_str("</sec>\n");
    x
}

fn yaml_str(s: &str) -> String {
    // A double-quoted YAML scalar is a JSON string.
    serde_json::to_string(s).expect("strings always serialise")
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The model card (README.md of `adapter/` or `model/`): Hugging Face front matter, the plain
/// account, the hyper-parameters and the checksums.
pub fn to_markdown(record: &DisclosureRecord) -> String {
    let r = record;
    let lora = r.method.kind == "lora";
    let mut m = String::from("---\n");
    m.push_str(&format!("base_model: {}\n", yaml_str(&r.base_model.name)));
    m.push_str(&format!(
        "library_name: {}\n",
        if lora { "peft" } else { "transformers" }
    ));
    m.push_str("tags:\n  - retune\n");
    m.push_str(&format!("  - {}\n", if lora { "lora" } else { "full" }));
    m.push_str("  - fine-tuned\n");
    m.push_str(&format!("  - {}\n", yaml_str(&r.method.objective.kind)));
    let datasets: Vec<String> = r
        .data
        .files
        .iter()
        .filter(|f| f.role != "retention")
        .map(|f| file_name(&f.path))
        .collect();
    if !datasets.is_empty() {
        m.push_str("datasets:\n");
        for d in datasets {
            m.push_str(&format!("  - {}\n", yaml_str(&d)));
        }
    }
    m.push_str("---\n\n");
    m.push_str(&format!(
        "# {} {}\n\n",
        r.base_model.name,
        if lora { "LoRA adapter" } else { "fine-tuned" }
    ));
    m.push_str(&summary_sentences(r).join(" "));
    m.push_str("\n\n## Hyper-parameters\n\n| Parameter | Value |\n|---|---|\n");
    for (k, v) in hyper_parameters(r) {
        m.push_str(&format!("| {} | {} |\n", md_cell(&k), md_cell(&v)));
    }
    m.push_str("\n## Checksums (sha256)\n\n| File | sha256 |\n|---|---|\n");
    for (k, v) in hash_rows(r) {
        m.push_str(&format!("| {} | `{}` |\n", md_cell(&k), md_cell(&v)));
    }
    m.push_str(&format!(
        "\nMade with retune {} (commit {}); the full record is `disclosure.json` in the run folder. \
         Check a base model with `retune verify {} --model MODEL`.\n",
        r.retune.version,
        short(&r.retune.commit),
        r.outputs.dir.as_deref().unwrap_or("RUN_DIR")
    ));
    m
}
