//! kiln-tokenizer: writes ONNX tokenizer models from a tokenizer.json (and tokenizer_config.json beside it):
//! an encoder (string → input_ids, attention_mask; `HfJsonTokenizer`) and a decoder (ids → string; `HfJsonDecoder`),
//! both in onnxruntime-extensions' domain `ai.onnx.contrib`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: kiln-tokenizer TOKENIZER.json [--config tokenizer_config.json] [--out DIR] [--keep-special]

Writes DIR/tokenizer.onnx (input_text: string [batch] -> input_ids, attention_mask: int64 [batch, sequence]) and
DIR/detokenizer.onnx (ids: int64 [batch, sequence] -> text: string [batch]).

options:
  --config FILE     tokenizer_config.json (default: beside TOKENIZER.json when present)
  --out DIR         output folder (default: the current folder)
  --keep-special    the decoder keeps special tokens (default: skips them)
  -h, --help        this help";

fn run(args: &[String]) -> Result<(), String> {
    let mut tokenizer: Option<PathBuf> = None;
    let mut config: Option<PathBuf> = None;
    let mut out = PathBuf::from(".");
    let mut skip_special = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--config" => config = Some(it.next().ok_or("--config needs a file")?.into()),
            "--out" => out = it.next().ok_or("--out needs a folder")?.into(),
            "--keep-special" => skip_special = false,
            other if other.starts_with('-') => return Err(format!("unknown option {other}\n\n{USAGE}")),
            other if tokenizer.is_none() => tokenizer = Some(other.into()),
            other => return Err(format!("unexpected argument {other}\n\n{USAGE}")),
        }
    }
    let tokenizer = tokenizer.ok_or_else(|| USAGE.to_string())?;
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let json = read(&tokenizer)?;
    let config = match config {
        Some(c) => read(&c)?,
        None => match tokenizer.parent().map(|d| d.join("tokenizer_config.json")).filter(|p| p.is_file()) {
            Some(c) => read(&c)?,
            None => String::new(),
        },
    };
    let encoder = kiln_ops::tokenizer::model_from_tokenizer_json(&json, &config)
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    let decoder = kiln_ops::tokenizer::decoder_model_from_tokenizer_json(&json, &config, skip_special)
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, bytes) in [("tokenizer.onnx", encoder), ("detokenizer.onnx", decoder)] {
        let path = out.join(name);
        std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-tokenizer: {e}");
            ExitCode::FAILURE
        }
    }
}
