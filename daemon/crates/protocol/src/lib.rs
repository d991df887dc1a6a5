//! The byclaw gateway's wire protocol, as the reference Python SDK
//! (`byclaw-gateway-sdk`) speaks it: Redis key names, identifiers, the
//! control-entry JSON on `ctrl:*` streams, the DataMessage JSON on session
//! data streams, and the session registry's execution records with the Lua
//! scripts that keep them.
//!
//! Everything that talks to the gateway's Redis — the daemon, the client
//! library, the bridge, the CLI — shapes its bytes here, so what goes on the
//! wire is decided in one place (see `../shared/WIRE.md`). Apart from the
//! execution registry's scripts, which run on a connection the caller
//! brings, nothing here does I/O.

mod control;
mod event;
mod execution;
pub mod ids;
pub mod keys;
pub mod workers;

pub use control::*;
pub use event::*;
pub use execution::*;
pub use ids::*;

/// Key prefix shared by every key of the protocol.
pub const PREFIX: &str = "byai_gateway";

/// Lifetime of session streams and registries, seconds (reference default).
pub const DEFAULT_SESSION_TTL_S: u64 = 604_800;
