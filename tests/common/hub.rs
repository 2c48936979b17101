//! The loopback Hub emulator (tests/support/hub_emulator.py) as a test fixture.

use dreambridge::hub::push::PushOptions;
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Stdio};

pub const TOKEN: &str = "hf_test_token_123";

/// The emulator on 127.0.0.1 with 256 KiB multipart parts (part URLs under zero-padded keys,
/// unless `extra` says otherwise); killed when dropped.
pub struct Hub {
    child: Child,
    pub url: String,
}

impl Hub {
    pub fn start() -> Hub {
        Hub::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Hub {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hub_emulator.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .args(["--token", TOKEN, "--part-size", "262144"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the emulator");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        Hub { child, url: format!("http://127.0.0.1:{}", line.trim()) }
    }

    pub fn get(&self, path: &str) -> ureq::Response {
        ureq::get(&format!("{}{path}", self.url)).call().unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn json(&self, path: &str) -> Value {
        self.get(path).into_json().unwrap()
    }

    pub fn faults(&self, cfg: Value) {
        ureq::post(&format!("{}/_test/faults", self.url)).send_json(cfg).unwrap();
    }

    /// (method, path) of every request so far.
    pub fn log(&self) -> Vec<(String, String)> {
        self.json("/_test/log").as_array().unwrap().iter().map(|e| (e["method"].as_str().unwrap().into(), e["path"].as_str().unwrap().into())).collect()
    }

    pub fn count(&self, method: &str, contains: &str) -> usize {
        self.log().iter().filter(|(m, p)| m == method && p.contains(contains)).count()
    }

    pub fn opts(&self, repo: &str) -> PushOptions {
        PushOptions { repo: repo.into(), endpoint: Some(self.url.clone()), token: Some(TOKEN.into()), ..Default::default() }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

