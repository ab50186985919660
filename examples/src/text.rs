//! Token ids ↔ text through `tokenizer.json` beside the model (or one level above), when kiln-run is built with the
//! `text` feature (the `tokenizers` crate, pure Rust: fancy-regex, no onig).

use std::path::{Path, PathBuf};

/// `tokenizer.json` beside the model or one level above.
pub fn tokenizer_path(model: &Path) -> Option<PathBuf> {
    let dir = model.parent()?;
    [Some(dir), dir.parent()].into_iter().flatten().map(|d| d.join("tokenizer.json")).find(|p| p.is_file())
}

pub fn unavailable_reason(model: &Path) -> String {
    match tokenizer_path(model) {
        None => format!("--prompt needs a tokenizer.json beside {} or one level above; use --ids", model.display()),
        Some(_) if !cfg!(feature = "text") => "--prompt needs kiln-run built with the `text` feature; use --ids".into(),
        Some(p) => format!("{} could not be loaded; use --ids", p.display()),
    }
}

#[cfg(feature = "text")]
pub struct Tokenizer(tokenizers::Tokenizer);

#[cfg(feature = "text")]
impl Tokenizer {
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, String> {
        let enc = self.0.encode(text, false).map_err(|e| format!("tokenizing the prompt: {e}"))?;
        Ok(enc.get_ids().iter().map(|i| *i as i64).collect())
    }
    pub fn decode(&self, ids: &[i64]) -> Result<String, String> {
        let ids: Vec<u32> = ids.iter().map(|i| *i as u32).collect();
        self.0.decode(&ids, false).map_err(|e| e.to_string())
    }
}

#[cfg(feature = "text")]
pub fn find_tokenizer(model: &Path) -> Option<Tokenizer> {
    let path = tokenizer_path(model)?;
    match tokenizers::Tokenizer::from_file(&path) {
        Ok(t) => Some(Tokenizer(t)),
        Err(e) => {
            eprintln!("note: {} not loaded: {e}", path.display());
            None
        }
    }
}

#[cfg(not(feature = "text"))]
pub struct Tokenizer;

#[cfg(not(feature = "text"))]
impl Tokenizer {
    pub fn encode(&self, _text: &str) -> Result<Vec<i64>, String> {
        Err("kiln-run was built without the `text` feature".into())
    }
    pub fn decode(&self, _ids: &[i64]) -> Result<String, String> {
        Err("kiln-run was built without the `text` feature".into())
    }
}

#[cfg(not(feature = "text"))]
pub fn find_tokenizer(_model: &Path) -> Option<Tokenizer> {
    None
}
