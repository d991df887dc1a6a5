//! `runtime`: logging, the cancel flag, the plugin's configuration values.

use super::TaskState;
use crate::bindings::LogLevel;
use crate::bindings::byclaw::gateway::runtime::Host;

/// Longest guest log message kept, bytes.
const MAX_LOG_MESSAGE: usize = 8192;

impl Host for TaskState {
    async fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        let _timer = self.timed(crate::port::HostImport::Log);
        let (plugin, message_id) = match (&self.host, &self.hook) {
            (Some(host), _) => (host.task.plugin_label.clone(), host.task.message_id.clone()),
            (None, Some(hook)) => (hook.plugin_label.clone(), "-".into()),
            (None, None) => ("loader".into(), "-".into()),
        };
        let mut text = message.as_str();
        if !self.output.admit(text.len().min(MAX_LOG_MESSAGE)) {
            return Ok(());
        }
        if text.len() > MAX_LOG_MESSAGE {
            let mut end = MAX_LOG_MESSAGE;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text = &text[..end];
        }
        match level {
            LogLevel::Trace => tracing::trace!(%plugin, %message_id, "{text}"),
            LogLevel::Debug => tracing::debug!(%plugin, %message_id, "{text}"),
            LogLevel::Info => tracing::info!(%plugin, %message_id, "{text}"),
            LogLevel::Warn => tracing::warn!(%plugin, %message_id, "{text}"),
            LogLevel::Error => tracing::error!(%plugin, %message_id, "{text}"),
        }
        Ok(())
    }

    async fn get_config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        let _timer = self.timed(crate::port::HostImport::GetConfig);
        if let Some(hook) = &self.hook {
            return Ok(hook.config.get(&key).cloned());
        }
        let host = self.host("get-config")?;
        Ok(host.plugin.policy().config.get(&key).cloned())
    }

    async fn is_cancelled(&mut self) -> wasmtime::Result<bool> {
        let _timer = self.timed(crate::port::HostImport::IsCancelled);
        if self.hook.is_some() {
            return Ok(false);
        }
        Ok(self.host("is-cancelled")?.task.cancel.is_requested())
    }
}
