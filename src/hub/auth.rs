//! Hub endpoint and token, resolved the way huggingface_hub does. The token is kept in a type
//! that never prints it.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// A Hub access token. `Debug`/`Display` show only that one is set.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(value: &str) -> Token {
        Token(value.trim().to_string())
    }

    /// The `Authorization` header value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// The raw value, for clients that take it as a string (never log it).
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Replaces the token wherever it appears in `text` (for error messages from servers).
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "hf_***")
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(hf_***)")
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hf_***")
    }
}

/// `HF_ENDPOINT`, else the public Hub.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string()
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = std::env::var_os("HF_HOME") {
        return PathBuf::from(h);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("huggingface")
}

/// The token: `--token`, else `HF_TOKEN`, else the file at `HF_TOKEN_PATH`, else `$HF_HOME/token`
/// (what `huggingface-cli login` writes).
pub fn resolve_token(flag: Option<&str>) -> Result<Token> {
    if let Some(t) = flag.filter(|t| !t.trim().is_empty()) {
        return Ok(Token::new(t));
    }
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(Token::new(&t));
        }
    }
    let path = std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home().join("token"));
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(Token::new(&t)),
        _ => bail!("no Hub token: pass --token, set HF_TOKEN, or log in (token file {} not found)", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_prints() {
        let t = Token::new("hf_secret123\n");
        assert_eq!(format!("{t} {t:?}"), "hf_*** Token(hf_***)");
        assert_eq!(t.bearer(), "Bearer hf_secret123");
        assert_eq!(t.redact("bad token hf_secret123 here"), "bad token hf_*** here");
        assert_eq!(resolve_token(Some("hf_flag")).unwrap().bearer(), "Bearer hf_flag");
    }
}
