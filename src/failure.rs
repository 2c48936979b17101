//! Whether a failed run is worth retrying, for schedulers that retry jobs (Kubernetes Jobs, Slurm
//! arrays): running out of memory and the Hub or the network failing are retryable; bad input
//! and everything else are not. The command line exits with [`RETRYABLE_EXIT`] or 1 accordingly.

/// `EX_TEMPFAIL` from sysexits.h: "try again later".
pub const RETRYABLE_EXIT: u8 = 75;

/// Marks an error as transient (the Hub's 5xx after every retry, a dropped connection).
#[derive(Debug)]
pub struct Retryable(pub String);

impl std::fmt::Display for Retryable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Retryable {}

/// True when `e` (or a cause) is transient: [`Retryable`], an out-of-memory error (CUDA's or an
/// allocator's), a network I/O error, or an HTTP 5xx / 429 from a Hub client.
pub fn is_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if cause.downcast_ref::<Retryable>().is_some() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(io.kind(), TimedOut | ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | OutOfMemory) {
                return true;
            }
        }
        let text = cause.to_string().to_lowercase();
        text.contains("out of memory") || text.contains("out_of_memory") || ["status code 5", "status code 429", "http 5", "http 429"].iter().any(|s| text.contains(s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_told_from_permanent_ones() {
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").context("step 3");
        assert!(is_retryable(&oom));
        assert!(is_retryable(&anyhow::Error::new(Retryable("upload: failed after 5 attempts (last: HTTP 503)".into())).context("pushing")));
        assert!(is_retryable(&anyhow::anyhow!("request error: https://hf.co/x: status code 502")));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_retryable(&anyhow::Error::new(io).context("download")));
        assert!(!is_retryable(&anyhow::anyhow!("dog/: no images (png, jpg, webp)")));
        assert!(!is_retryable(&anyhow::anyhow!("HTTP 401: the Hub refused the token")));
    }
}
