//! The one place the WIT worlds are turned into Rust. Host functions are
//! async (a guest blocked in `call-tool` costs no thread) and trappable (a
//! host function can end a misbehaving guest with a clear reason).
//!
//! The bindings are of `agent-with-hooks`, the larger world; its imports are
//! the `agent` world's. Every plugin exports `handler`; `hooks` is optional,
//! so the exports are looked up one interface at a time ([`AgentPre`])
//! instead of through the world's all-or-nothing `instantiate`.

wasmtime::component::bindgen!({
    path: "../../../wit",
    world: "byclaw:gateway/agent-with-hooks",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::byclaw::gateway::types::{
    Chunk, Command, Error as GuestError, Event, Header, LogLevel, Manifest, Workspace,
};
pub use self::exports::byclaw::gateway::handler::Guest as Handler;
pub use self::exports::byclaw::gateway::hooks::{Guest as Hooks, Hook as WitHook, TaskInfo};

use self::exports::byclaw::gateway::{handler, hooks};
use wasmtime::component::{Instance, InstancePre};
use wasmtime::{AsContextMut, Store};

/// The name the `hooks` interface is exported under.
const HOOKS_EXPORT: &str = "byclaw:gateway/hooks@0.1.0";

/// A plugin's component with its imports resolved and its exports looked up
/// once per version: instantiating it for a task is the pool's work only.
pub struct AgentPre<T: 'static> {
    instance_pre: InstancePre<T>,
    handler: handler::GuestIndices,
    /// `None` when the plugin exports no hooks.
    hooks: Option<hooks::GuestIndices>,
}

impl<T: Send + 'static> AgentPre<T> {
    /// Looks up the exports; a missing `handler`, or a `hooks` export that
    /// lacks a function, is an error.
    pub fn new(instance_pre: InstancePre<T>) -> wasmtime::Result<Self> {
        let handler = handler::GuestIndices::new(&instance_pre)?;
        let hooks = match instance_pre
            .component()
            .get_export_index(None, HOOKS_EXPORT)
        {
            Some(_) => Some(hooks::GuestIndices::new(&instance_pre)?),
            None => None,
        };
        Ok(AgentPre {
            instance_pre,
            handler,
            hooks,
        })
    }

    /// A new instance in `store`.
    pub async fn instantiate(&self, store: &mut Store<T>) -> wasmtime::Result<Instance> {
        self.instance_pre.instantiate_async(store).await
    }

    /// The `handler` functions of an instance (their types checked).
    pub fn handler(
        &self,
        store: impl AsContextMut,
        instance: &Instance,
    ) -> wasmtime::Result<Handler> {
        self.handler.load(store, instance)
    }

    /// The `hooks` functions of an instance, if it exports them.
    pub fn hooks(
        &self,
        store: impl AsContextMut,
        instance: &Instance,
    ) -> wasmtime::Result<Option<Hooks>> {
        self.hooks
            .as_ref()
            .map(|indices| indices.load(store, instance))
            .transpose()
    }
}
