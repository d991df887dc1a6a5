//! An agent written in C, built into a component with wit-bindgen's C
//! generator, Debian's clang + wasi-libc and `wasm-tools component new`
//! (`plugins/c-echo/build.sh`), runs in gatewayd like a Rust one.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_agent_serves_tasks() -> anyhow::Result<()> {
    // clang from Debian, wit-bindgen and wasm-tools from crates.io, all
    // cached after the first run. The plugin decodes the JSON `content`
    // itself and writes its result JSON by hand.
    integration_tests::echo_agent_built_by_its_script_serves_tasks("c-echo", "c").await
}
