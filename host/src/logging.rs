//! The process log's filter: the operator's directives, with the plugin
//! runtime's own crates kept at `warn` unless the operator names them.
//!
//! wasmtime, cranelift and their parsers log compiler internals at `debug`
//! and `trace` (about 8,700 lines for one request at `--log-level debug`),
//! which bury the proxy's own lines. As Envoy's component log levels and
//! NGINX's per-module `error_log` levels do, the noisy components get their
//! own level; `--log-level debug,wasmtime=trace` (or `RUST_LOG`) still turns
//! them up.

/// Crates (tracing target prefixes) kept at `warn` by [`filter`].
pub const QUIET_TARGETS: [&str; 6] = [
    "wasmtime",
    "cranelift",
    "regalloc2",
    "wasmparser",
    "wit_parser",
    "wit_component",
];

/// The `tracing` env-filter directives for `directives` (a level such as
/// `debug`, or directives such as `info,wasmlb=debug`): each
/// [`QUIET_TARGETS`] crate the directives do not name is added at `warn`,
/// or at `error`/`off` when that is the default level asked for (a quieter
/// default is never made louder).
pub fn filter(directives: &str) -> String {
    let default = directives
        .split(',')
        .map(str::trim)
        .rfind(|d| !d.contains('='))
        .unwrap_or("")
        .to_ascii_lowercase();
    let quiet = match default.as_str() {
        "off" => "off",
        "error" => "error",
        _ => "warn",
    };
    let mut out = directives.trim().to_string();
    for target in QUIET_TARGETS {
        if !directives.contains(target) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(target);
            out.push('=');
            out.push_str(quiet);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_crates_stay_quiet_unless_named() {
        assert_eq!(
            filter("debug"),
            "debug,wasmtime=warn,cranelift=warn,regalloc2=warn,wasmparser=warn,\
             wit_parser=warn,wit_component=warn"
        );
        let named = filter("debug,wasmtime=trace");
        assert!(
            named.starts_with("debug,wasmtime=trace,cranelift=warn"),
            "{named}"
        );
        assert_eq!(named.matches("wasmtime").count(), 1, "{named}");
        assert!(filter("error").contains("cranelift=error"));
        assert!(filter("off").contains("wasmtime=off"));
        assert!(filter("wasmlb=debug").starts_with("wasmlb=debug,wasmtime=warn"));
        assert!(filter("").starts_with("wasmtime=warn"));
        // The result is a valid filter.
        for d in ["debug", "info,wasmlb=trace", "", "warn"] {
            tracing_subscriber::EnvFilter::try_new(filter(d)).expect("valid directives");
        }
    }
}
