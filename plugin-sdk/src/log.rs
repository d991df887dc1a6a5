use super::host::runtime;
use super::host::types::LogLevel;

/// Debugging detail.
pub fn debug(message: &str) {
    runtime::log(LogLevel::Debug, message);
}
/// Normal operation.
pub fn info(message: &str) {
    runtime::log(LogLevel::Info, message);
}
/// Something unexpected that the agent handled.
pub fn warn(message: &str) {
    runtime::log(LogLevel::Warn, message);
}
/// Something failed.
pub fn error(message: &str) {
    runtime::log(LogLevel::Error, message);
}
