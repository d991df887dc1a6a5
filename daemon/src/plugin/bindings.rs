//! The one place the `agent` world is turned into Rust. Host functions are
//! async (a guest blocked in `call-tool` costs no thread) and trappable (a
//! host function can end a misbehaving guest with a clear reason).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "byclaw:gateway/agent",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::byclaw::gateway::types::{
    Chunk, Command, Error as GuestError, Event, Header, LogLevel, Manifest, Workspace,
};
