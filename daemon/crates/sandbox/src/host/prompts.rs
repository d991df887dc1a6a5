//! `prompts`: renders the prompt templates plugins ship in their manifests.

use super::TaskState;
use crate::bindings::GuestError;
use crate::bindings::byclaw::gateway::prompts::Host;

/// Fills `{name}` placeholders; `{{` / `}}` are literal braces. Returns the
/// missing variables, in order of first use, when any is missing.
pub fn render(template: &str, variables: &[(String, String)]) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(template.len());
    let mut missing: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('}') {
            out.push('}');
            rest = after;
            continue;
        }
        let Some(close) = tail.find('}') else {
            out.push_str(tail);
            rest = "";
            break;
        };
        let name = &tail[1..close];
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.');
        if !is_name {
            // Not a placeholder (e.g. JSON in the template): keep it as text.
            out.push('{');
            rest = &tail[1..];
            continue;
        }
        match variables.iter().find(|(key, _)| key == name) {
            Some((_, value)) => out.push_str(value),
            None => {
                if !missing.iter().any(|m| m == name) {
                    missing.push(name.to_owned());
                }
            }
        }
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

impl Host for TaskState {
    async fn render_prompt(
        &mut self,
        name: String,
        variables: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<String, GuestError>> {
        let _timer = self.timed(crate::port::HostImport::RenderPrompt);
        let host = self.host("render-prompt")?;
        let table = host.task.plugins.load();
        let (plugin, prompt_name) = match name.split_once('/') {
            Some((plugin_id, prompt)) => (table.plugin(plugin_id).cloned(), prompt),
            None => (Some(host.plugin.clone()), name.as_str()),
        };
        let Some(prompt) = plugin
            .as_ref()
            .and_then(|p| p.manifest.prompts.iter().find(|p| p.name == prompt_name))
        else {
            return Ok(Err(GuestError::NotFound(format!("no prompt {name:?}"))));
        };
        Ok(render(&prompt.template, &variables).map_err(|missing| {
            GuestError::InvalidInput(format!(
                "prompt {name:?} needs variables that were not given: {}",
                missing.join(", ")
            ))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::render;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fills_placeholders_and_keeps_literal_braces() {
        let out = render(
            "Summarize {text} for {who}. {{literal}} {\"json\": 1} {text}",
            &vars(&[("text", "this"), ("who", "me")]),
        );
        assert_eq!(
            out.unwrap(),
            "Summarize this for me. {literal} {\"json\": 1} this"
        );
    }

    #[test]
    fn reports_every_missing_variable_once() {
        let out = render("{a} {b} {a} {c}", &vars(&[("b", "x")]));
        assert_eq!(out.unwrap_err(), ["a", "c"]);
    }

    #[test]
    fn unclosed_braces_are_text() {
        assert_eq!(render("a { b", &[]).unwrap(), "a { b");
        assert_eq!(render("a } b", &[]).unwrap(), "a } b");
    }
}
