//! Hostile test plugin: a `std` guest built with wit-bindgen directly that
//! reads a file, so its component imports `wasi:filesystem`. The host must
//! refuse to load it, naming the import.
#![allow(unsafe_code, missing_docs)]

#[cfg(target_arch = "wasm32")]
mod guest {
    wit_bindgen::generate!({ path: "../../../wit", world: "balancer" });

    use exports::wasmlb::plugin::strategy::Guest;
    use wasmlb::plugin::types::{Backend, Decision};

    struct ReadsFiles;

    impl Guest for ReadsFiles {
        fn init(_config: String) -> Result<(), String> {
            std::fs::read_to_string("/etc/passwd")
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        fn set_backends(_backends: Vec<Backend>) {}
        fn select() -> Decision {
            Decision::Unavailable
        }
    }

    export!(ReadsFiles);
}
