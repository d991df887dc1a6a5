//! The manifest a plugin exports: its id, version, capabilities, tools and
//! prompts, built with [`Manifest::new`] and its setters.

use super::*;

/// What the plugin is and serves: see [`Agent::manifest`].
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    id: String,
    version: String,
    description: String,
    capabilities: Vec<String>,
    tools: Vec<Tool>,
    prompts: Vec<Prompt>,
    workspace: bool,
}

impl Manifest {
    /// A manifest with a plugin id (`[a-z0-9_-]`) and version.
    pub fn new(id: impl Into<String>, version: impl Into<String>) -> Self {
        Manifest {
            id: id.into(),
            version: version.into(),
            ..Manifest::default()
        }
    }

    /// One line for operators.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// An agent type this plugin serves (its stream is
    /// `byai_gateway:ctrl:capability:{agent_type}`).
    pub fn capability(mut self, agent_type: impl Into<String>) -> Self {
        self.capabilities.push(agent_type.into());
        self
    }

    /// A tool the plugin offers.
    pub fn tool(mut self, tool: Tool) -> Self {
        self.tools.push(tool);
        self
    }

    /// Asks for a task workspace: [`Command::private_dir`] and
    /// [`Command::public_dir`] exist and are the only directories the
    /// plugin can open. Without it the plugin has no file system at all, and
    /// its tasks are cheaper (no directories are created).
    pub fn workspace(mut self) -> Self {
        self.workspace = true;
        self
    }

    /// A prompt template the plugin ships.
    pub fn prompt(mut self, prompt: Prompt) -> Self {
        self.prompts.push(prompt);
        self
    }

    pub(crate) fn into_wit(self) -> guest::Manifest {
        guest::Manifest {
            id: self.id,
            version: self.version,
            description: self.description,
            capabilities: self.capabilities,
            workspace: self.workspace,
            tools: self
                .tools
                .into_iter()
                .map(|t| host::types::Tool {
                    name: t.name,
                    description: t.description,
                    input_schema: t.input_schema.to_string(),
                })
                .collect(),
            prompts: self
                .prompts
                .into_iter()
                .map(|p| host::types::Prompt {
                    name: p.name,
                    description: p.description,
                    template: p.template,
                })
                .collect(),
        }
    }
}

/// A tool: name, description, JSON Schema of its arguments.
#[derive(Debug, Clone)]
pub struct Tool {
    /// What a caller names (`call-tool`), unique in the plugin.
    pub name: String,
    /// What it does, for people and for models choosing a tool.
    pub description: String,
    /// JSON Schema of its arguments: the host checks every call against it.
    pub input_schema: Value,
}

impl Tool {
    /// A tool taking the arguments described by `input_schema`.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        input_schema: Value,
    ) -> Self {
        Tool {
            name: name.into(),
            description: description.into(),
            input_schema,
        }
    }
}

/// A prompt template with `{variable}` placeholders.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Its name, unique in the plugin.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// The text, with `{variable}` placeholders.
    pub template: String,
}

impl Prompt {
    /// A named template.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        template: impl Into<String>,
    ) -> Self {
        Prompt {
            name: name.into(),
            description: description.into(),
            template: template.into(),
        }
    }
}
