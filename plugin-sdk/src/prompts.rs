use super::{Error, host};

/// Renders a prompt of this plugin's manifest (or `plugin-id/name`):
/// `{variable}` placeholders filled, `{{` / `}}` literal braces. Missing
/// variables are an [`Error::InvalidInput`] naming them.
pub fn render(name: &str, variables: &[(&str, &str)]) -> Result<String, Error> {
    let variables: Vec<(String, String)> = variables
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    host::prompts::render_prompt(name, &variables).map_err(Error::from_wit)
}
