//! The Hub's HTTP API for publishing: repo creation, preupload, the Git LFS batch API (single and
//! multipart PUTs, verify) and the NDJSON commit. Transient failures (5xx, 429, connection
//! errors) are retried with exponential backoff; a multipart upload retries only the failed part.

use super::auth::Token;
use super::local_files::LocalFile;
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

pub struct HubClient {
    pub endpoint: String,
    token: Token,
    agent: ureq::Agent,
    pub max_attempts: u32,
    pub backoff: Duration,
}

/// What the server said to do with one file.
#[derive(Clone, Debug)]
pub struct UploadMode {
    pub lfs: bool,
    /// The id of the file already in the repo at that path, if any.
    pub remote_oid: Option<String>,
}

/// One LFS object's instructions from the batch API (`None` actions: already stored).
#[derive(Clone, Debug)]
pub struct LfsActions {
    pub upload: Option<Value>,
    pub verify: Option<Value>,
}

enum Failure {
    Transient(String),
    Final(anyhow::Error),
}

impl HubClient {
    pub fn new(endpoint: &str, token: Token) -> HubClient {
        let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(30)).timeout_read(Duration::from_secs(300)).build();
        HubClient { endpoint: endpoint.trim_end_matches('/').to_string(), token, agent, max_attempts: 5, backoff: Duration::from_millis(500) }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    /// Runs `call` until it succeeds, fails for good, or runs out of attempts.
    fn retry<T>(&self, what: &str, mut call: impl FnMut() -> Result<T, ureq::Error>) -> Result<T> {
        let mut last = String::new();
        for attempt in 0..self.max_attempts {
            if attempt > 0 {
                std::thread::sleep(self.backoff * 2u32.pow(attempt - 1));
            }
            match self.classify(call()) {
                Ok(v) => return Ok(v),
                Err(Failure::Final(e)) => return Err(e.context(what.to_string())),
                Err(Failure::Transient(msg)) => last = msg,
            }
        }
        Err(crate::failure::Retryable(format!("{what}: failed after {} attempts (last: {last})", self.max_attempts)).into())
    }

    fn classify<T>(&self, r: Result<T, ureq::Error>) -> Result<T, Failure> {
        match r {
            Ok(v) => Ok(v),
            Err(ureq::Error::Status(code, resp)) => {
                let message = resp.header("X-Error-Message").map(str::to_string).unwrap_or_else(|| resp.into_string().unwrap_or_default());
                let message = self.token.redact(&message);
                match code {
                    500..=599 | 429 => Err(Failure::Transient(format!("HTTP {code} {message}"))),
                    401 | 403 => Err(Failure::Final(anyhow!("HTTP {code}: the Hub refused the token ({message})"))),
                    _ => Err(Failure::Final(anyhow!("HTTP {code}: {message}"))),
                }
            }
            Err(ureq::Error::Transport(t)) => Err(Failure::Transient(self.token.redact(&t.to_string()))),
        }
    }

    fn post_json(&self, path_or_url: &str, body: &Value, auth: bool) -> Result<ureq::Response, ureq::Error> {
        let url = if path_or_url.starts_with("http") { path_or_url.to_string() } else { self.url(path_or_url) };
        let mut req = self.agent.post(&url);
        if auth {
            req = req.set("Authorization", &self.token.bearer());
        }
        req.send_json(body.clone())
    }

    /// Creates the model repo; an existing one is fine.
    pub fn create_repo(&self, repo_id: &str, private: bool) -> Result<()> {
        let (org, name) = repo_id.split_once('/').with_context(|| format!("repo id `{repo_id}` must be `namespace/name`"))?;
        let body = json!({"name": name, "organization": org, "type": "model", "private": private});
        let r = self.retry("create repo", || match self.post_json("/api/repos/create", &body, true) {
            Err(ureq::Error::Status(409, _)) => Ok(None),
            other => other.map(Some),
        });
        r.map(|_| ())
    }

    /// Creates the model repo `name` or `namespace/name` (an existing one is fine) and returns its
    /// full id. A bare name goes under the token's user, as `huggingface_hub.create_repo` does:
    /// the id is read from the reply's `url`, or asked of `/api/whoami-v2`.
    pub fn create_repo_named(&self, spec: &str, private: bool) -> Result<String> {
        let (org, name) = match spec.split_once('/') {
            Some((o, n)) => (Some(o), n),
            None => (None, spec),
        };
        ensure!(!name.is_empty() && !name.contains('/'), "repo id `{spec}` must be `name` or `namespace/name`");
        let body = json!({"name": name, "organization": org, "type": "model", "private": private});
        let reply: Value = self.retry("create repo", || match self.post_json("/api/repos/create", &body, true) {
            Ok(r) => Ok(r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(409, r)) => Ok(r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(e) => Err(e),
        })?;
        if let Some(o) = org {
            return Ok(format!("{o}/{name}"));
        }
        let from_url = reply["url"].as_str().and_then(|u| {
            let mut parts = u.trim_end_matches('/').rsplit('/');
            let (n, ns) = (parts.next()?, parts.next()?);
            (n == name && !ns.contains(':') && !ns.is_empty()).then(|| format!("{ns}/{n}"))
        });
        if let Some(id) = from_url {
            return Ok(id);
        }
        let who: Value = self.retry("who am I", || {
            let r = self.agent.get(&self.url("/api/whoami-v2")).set("Authorization", &self.token.bearer()).call()?;
            Ok(r.into_json::<Value>().unwrap_or(Value::Null))
        })?;
        let user = who["name"].as_str().context("the Hub's /api/whoami-v2 reply names no user")?;
        Ok(format!("{user}/{name}"))
    }

    /// Creates a branch from main; an existing one is fine.
    pub fn create_branch(&self, repo_id: &str, branch: &str) -> Result<()> {
        let path = format!("/api/models/{repo_id}/branch/{}", quote(branch));
        self.retry("create branch", || match self.post_json(&path, &json!({}), true) {
            Err(ureq::Error::Status(409, _)) => Ok(None),
            other => other.map(Some),
        })
        .map(|_| ())
    }

    /// Lets the Hub check a model card's YAML before anything is uploaded.
    pub fn validate_yaml(&self, content: &str) -> Result<()> {
        let body = json!({"content": content, "repoType": "model"});
        self.retry("model card (README.md) YAML check", || self.post_json("/api/validate-yaml", &body, true)).map(|_| ())
    }

    /// Asks which files go through LFS (batches of 256, as the Hub wants).
    pub fn preupload(&self, repo_id: &str, revision: &str, files: &[LocalFile]) -> Result<Vec<UploadMode>> {
        use base64::Engine;
        let mut modes = Vec::new();
        for chunk in files.chunks(256) {
            let list: Vec<Value> = chunk
                .iter()
                .map(|f| json!({"path": f.path_in_repo, "size": f.size, "sample": base64::engine::general_purpose::STANDARD.encode(&f.sample)}))
                .collect();
            let path = format!("/api/models/{repo_id}/preupload/{}", quote(revision));
            let resp: Value = self.retry("preupload", || self.post_json(&path, &json!({"files": list}), true))?.into_json()?;
            for f in chunk {
                let entry = resp["files"]
                    .as_array()
                    .and_then(|a| a.iter().find(|e| e["path"] == f.path_in_repo.as_str()))
                    .with_context(|| format!("preupload: no answer for {}", f.path_in_repo))?;
                let lfs = entry["uploadMode"] == "lfs" && f.size > 0;
                modes.push(UploadMode { lfs, remote_oid: entry["oid"].as_str().map(str::to_string) });
            }
        }
        Ok(modes)
    }

    /// The LFS batch API: upload instructions for each object.
    pub fn lfs_batch(&self, repo_id: &str, revision: &str, files: &[&LocalFile]) -> Result<Vec<LfsActions>> {
        let mut out = Vec::new();
        for chunk in files.chunks(100) {
            let objects: Vec<Value> = chunk.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect();
            let body = json!({"operation": "upload", "transfers": ["basic", "multipart"], "objects": objects, "hash_algo": "sha256", "ref": {"name": revision}});
            let url = self.url(&format!("/{repo_id}.git/info/lfs/objects/batch"));
            let resp: Value = self
                .retry("LFS batch", || {
                    self.agent
                        .post(&url)
                        .set("Authorization", &self.token.bearer())
                        .set("Accept", "application/vnd.git-lfs+json")
                        .set("Content-Type", "application/vnd.git-lfs+json")
                        .send_string(&body.to_string())
                })?
                .into_json()?;
            for f in chunk {
                let obj = resp["objects"]
                    .as_array()
                    .and_then(|a| a.iter().find(|o| o["oid"] == f.sha256.as_str()))
                    .with_context(|| format!("LFS batch: no answer for {}", f.path_in_repo))?;
                if let Some(err) = obj.get("error") {
                    bail!("LFS batch refused {}: {err}", f.path_in_repo);
                }
                out.push(LfsActions { upload: obj["actions"].get("upload").cloned(), verify: obj["actions"].get("verify").cloned() });
            }
        }
        Ok(out)
    }

    /// Sends one LFS object (single PUT, or multipart when the server gave `chunk_size`), then verifies.
    pub fn upload_lfs(&self, file: &LocalFile, actions: &LfsActions, on_bytes: &dyn Fn(u64)) -> Result<()> {
        let Some(upload) = &actions.upload else { return Ok(()) };
        let href = upload["href"].as_str().context("LFS upload action without href")?;
        let header = upload.get("header").and_then(Value::as_object).cloned().unwrap_or_default();
        if let Some(chunk) = header.get("chunk_size").and_then(|c| c.as_str().map(str::to_string).or_else(|| c.as_u64().map(|v| v.to_string()))) {
            let chunk: u64 = chunk.parse().ok().filter(|&c| c > 0).with_context(|| format!("{}: bad chunk_size `{chunk}` in the LFS batch answer", file.path_in_repo))?;
            let urls = part_urls(&header, file.size, chunk).with_context(|| format!("{}: the LFS batch answer for a multipart upload", file.path_in_repo))?;
            let parts = urls.len() as u64;
            let mut etags = Vec::new();
            for (n, url) in (1..=parts).zip(&urls) {
                let (start, len) = ((n - 1) * chunk, chunk.min(file.size - (n - 1) * chunk));
                let resp = self.retry(&format!("{}: part {n}/{parts}", file.path_in_repo), || self.put_range(url, file, start, len, &[]))?;
                let etag = resp.header("ETag").context("part upload returned no ETag")?.to_string();
                etags.push(json!({"partNumber": n, "etag": etag}));
                on_bytes(len);
            }
            let body = json!({"oid": file.sha256, "parts": etags});
            self.retry(&format!("{}: completing the multipart upload", file.path_in_repo), || {
                self.agent.post(href).set("Accept", "application/vnd.git-lfs+json").set("Content-Type", "application/vnd.git-lfs+json").send_string(&body.to_string())
            })?;
        } else {
            let extra: Vec<(String, String)> = header.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect();
            self.retry(&file.path_in_repo, || self.put_range(href, file, 0, file.size, &extra))?;
            on_bytes(file.size);
        }
        if let Some(verify) = &actions.verify {
            let href = verify["href"].as_str().context("verify action without href")?;
            self.retry(&format!("{}: verify", file.path_in_repo), || self.post_json(href, &json!({"oid": file.sha256, "size": file.size}), true))?;
        }
        Ok(())
    }

    /// PUTs bytes [start, start+len) of the file, streamed from disk. Pre-signed URLs take no token.
    fn put_range(&self, url: &str, file: &LocalFile, start: u64, len: u64, headers: &[(String, String)]) -> Result<ureq::Response, ureq::Error> {
        let mut f = std::fs::File::open(&file.abs).map_err(ureq::Error::from)?;
        f.seek(SeekFrom::Start(start)).map_err(ureq::Error::from)?;
        let mut req = self.agent.put(url).set("Content-Length", &len.to_string());
        for (k, v) in headers {
            req = req.set(k, v);
        }
        req.send(f.take(len))
    }

    /// The commit: NDJSON header line, then `file` (base64, regular) and `lfsFile` lines.
    pub fn commit(&self, repo_id: &str, revision: &str, message: &str, regular: &[&LocalFile], lfs: &[&LocalFile]) -> Result<String> {
        use base64::Engine;
        let mut body = json!({"key": "header", "value": {"summary": message, "description": ""}}).to_string();
        for f in regular {
            let content = std::fs::read(&f.abs).with_context(|| f.abs.display().to_string())?;
            let line = json!({"key": "file", "value": {"path": f.path_in_repo, "encoding": "base64", "content": base64::engine::general_purpose::STANDARD.encode(content)}});
            body.push('\n');
            body.push_str(&line.to_string());
        }
        for f in lfs {
            let line = json!({"key": "lfsFile", "value": {"path": f.path_in_repo, "algo": "sha256", "oid": f.sha256, "size": f.size}});
            body.push('\n');
            body.push_str(&line.to_string());
        }
        let url = self.url(&format!("/api/models/{repo_id}/commit/{}", quote(revision)));
        let resp: Value = self
            .retry("commit", || self.agent.post(&url).set("Authorization", &self.token.bearer()).set("Content-Type", "application/x-ndjson").send_string(&body))?
            .into_json()?;
        Ok(resp["commitOid"].as_str().unwrap_or_default().to_string())
    }
}

/// The part URLs of a multipart upload, in part order. The batch answer gives them under decimal
/// header keys, which servers may zero-pad (`"00001"`); like the official client, every
/// all-digit key counts, and there must be ceil(size / chunk) of them. Unlike it, the numbers
/// must also be exactly 1..=N, so a gap or a duplicate is refused instead of shifting parts.
fn part_urls(header: &serde_json::Map<String, Value>, size: u64, chunk: u64) -> Result<Vec<&str>> {
    let mut numbered: Vec<(u64, &str, &str)> = Vec::new();
    for (key, value) in header {
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
            continue; // chunk_size and any other header
        }
        let n: u64 = key.parse().with_context(|| format!("part number `{key}` is too large"))?;
        let url = value.as_str().with_context(|| format!("part `{key}`: the URL is not a string"))?;
        numbered.push((n, key, url));
    }
    numbered.sort_by_key(|&(n, _, _)| n);
    let expected = size.div_ceil(chunk);
    ensure!(
        numbered.len() as u64 == expected,
        "{} part URLs for {size} bytes in parts of {chunk} (expected {expected})",
        numbered.len()
    );
    for (want, &(n, key, _)) in (1u64..).zip(&numbered) {
        ensure!(n > 0, "part numbers start at 1 (key `{key}`)");
        ensure!(n >= want, "part {n} is given twice (key `{key}`)");
        ensure!(n == want, "part {want} has no URL (next key: `{key}`)");
    }
    Ok(numbered.into_iter().map(|(_, _, url)| url).collect())
}

/// URL-quotes a revision (branch names may hold `/`).
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(keys: &[&str]) -> serde_json::Map<String, Value> {
        let mut h = serde_json::Map::new();
        h.insert("chunk_size".into(), json!("10"));
        for k in keys {
            h.insert(k.to_string(), json!(format!("https://up/{k}")));
        }
        h
    }

    #[test]
    fn part_urls_accept_any_decimal_spelling_in_part_order() {
        let (padded, plain, mixed) = (header(&["00003", "00001", "00002"]), header(&["2", "1", "3"]), header(&["1", "002"]));
        assert_eq!(part_urls(&padded, 25, 10).unwrap(), ["https://up/00001", "https://up/00002", "https://up/00003"]);
        assert_eq!(part_urls(&plain, 30, 10).unwrap(), ["https://up/1", "https://up/2", "https://up/3"]);
        assert_eq!(part_urls(&mixed, 11, 10).unwrap(), ["https://up/1", "https://up/002"]);
    }

    #[test]
    fn part_urls_refuse_wrong_counts_gaps_and_duplicates() {
        let err = |keys: &[&str], size| part_urls(&header(keys), size, 10).unwrap_err().to_string();
        assert!(err(&["1", "2"], 25).contains("2 part URLs for 25 bytes in parts of 10 (expected 3)"));
        assert!(err(&["1", "2", "3", "4"], 25).contains("expected 3"));
        assert!(err(&["1", "2", "4"], 25).contains("part 3 has no URL (next key: `4`)"), "{}", err(&["1", "2", "4"], 25));
        assert!(err(&["1", "01", "2"], 25).contains("part 1 is given twice (key `01`)"), "{}", err(&["1", "01", "2"], 25));
        assert!(err(&["0", "1", "2"], 25).contains("part numbers start at 1 (key `0`)"));
        assert!(err(&["1", "2", "99999999999999999999999"], 25).contains("too large"));
    }
}
