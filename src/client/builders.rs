//! Builders for the Modal shape of the API types (sugar; the types have public fields).

use crate::api::Probe;

impl Probe {
    /// Ready when a TCP connect to `port` inside the sandbox succeeds (Modal's `Probe.with_tcp`).
    pub fn tcp(port: u16) -> Probe {
        Probe {
            tcp_port: Some(port),
            ..Probe::default()
        }
    }

    /// Ready when `argv` (run directly, not through a shell) exits 0 (Modal's `Probe.with_exec`).
    pub fn exec<I, S>(argv: I) -> Probe
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Probe {
            exec_argv: Some(argv.into_iter().map(Into::into).collect()),
            ..Probe::default()
        }
    }

    /// How often to try, in milliseconds (default 100).
    pub fn interval_ms(self, ms: u64) -> Probe {
        Probe {
            interval_ms: Some(ms),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_serialize_as_the_api_expects() {
        let p = Probe::tcp(8000).interval_ms(250);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"tcp_port":8000,"interval_ms":250}"#
        );
        let p = Probe::exec(["test", "-f", "/tmp/ready"]);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"exec_argv":["test","-f","/tmp/ready"]}"#
        );
    }
}
