//! `[workspace]`: where task workspaces live.

use super::*;

/// `[workspace]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkspaceConfig {
    /// Base of `{session}/public` and `{session}/private/{message}` directories.
    pub dir: PathBuf,
}

impl Default for WorkspaceConfig {
    fn default() -> Self {
        WorkspaceConfig {
            dir: PathBuf::from("/tmp/gateway-workspace"),
        }
    }
}
