//! A client of the byclaw gateway for Rust backends, the CLI, the bridge
//! and tests: it sends commands and reads events exactly as the reference
//! Python client does, so Python workers and `gatewayd` serve it alike.
//!
//! It needs Redis and nothing of the daemon: no WebAssembly engine, no
//! database. [`Client`] sends ASK_AGENT and RESUME commands, answers
//! `ask-user` prompts and cancels tasks; [`EventReader`] reads and follows
//! what tasks emit on session data streams; [`DeadLetter`]s are listed,
//! replayed and purged; [`connection`] opens the connections all use.
//!
//! ```no_run
//! # async fn demo() -> Result<(), byclaw_client::ClientError> {
//! use byclaw_client::{Client, new_session_id};
//!
//! let client = Client::connect("redis://127.0.0.1:6379").await?;
//! let session = new_session_id();
//! let mut reader = client.event_reader().await?;
//! let after = reader.last_entry_id(&session).await?;
//! let sent = client.send("echo", &session, "hello", serde_json::json!({})).await?;
//! let mut events = reader.follow(&session, &sent.message_id, &after);
//! while let Some(event) = events.next().await? {
//!     if let Some(text) = event.chunk() {
//!         print!("{text}");
//!     }
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
pub mod connection;
mod dead_letters;
mod events;

pub use client::*;
pub use dead_letters::*;
pub use events::*;
