//! The built-in strategies, compiled from `plugins/` by the build script and
//! embedded in the binary.

/// `(name, component bytes)` of every built-in strategy.
pub const PLUGINS: &[(&str, &[u8])] = &[
    (
        "round-robin",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-round-robin.wasm")),
    ),
    (
        "least-connections",
        include_bytes!(concat!(
            env!("OUT_DIR"),
            "/wasmlb-plugin-least-connections.wasm"
        )),
    ),
    (
        "random",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-random.wasm")),
    ),
    (
        "p2c",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-p2c.wasm")),
    ),
    (
        "ip-hash",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-ip-hash.wasm")),
    ),
    (
        "maglev",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-maglev.wasm")),
    ),
    (
        "canary",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-canary.wasm")),
    ),
    (
        "ring-hash",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-ring-hash.wasm")),
    ),
    (
        "peak-ewma",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-peak-ewma.wasm")),
    ),
    (
        "sticky",
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmlb-plugin-sticky.wasm")),
    ),
];

/// The component bytes of built-in strategy `name`, if there is one.
pub fn get(name: &str) -> Option<&'static [u8]> {
    PLUGINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// The names of the built-in strategies, for error messages.
pub fn names() -> Vec<&'static str> {
    PLUGINS.iter().map(|(n, _)| *n).collect()
}
