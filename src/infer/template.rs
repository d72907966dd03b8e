//! Chat templates: a model's own Jinja template, rendered as `transformers`'
//! `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`).

use anyhow::{Result, anyhow, bail};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;
use std::collections::BTreeMap;

/// Variables a template reads besides the conversation (Qwen3's
/// `enable_thinking`): the keyword arguments transformers'
/// `apply_chat_template` passes into the template. A variable left out is
/// undefined, so the template's own default holds.
pub type Kwargs = BTreeMap<String, serde_json::Value>;

/// The variables every template is given; a [`Kwargs`] may not name them.
const RESERVED: [&str; 4] = ["messages", "add_generation_prompt", "bos_token", "eos_token"];

/// Why `kwargs` cannot be given to a template: it names a variable prefgen sets.
pub fn reserved(kwargs: &Kwargs) -> Option<String> {
    let name = kwargs.keys().find(|k| RESERVED.contains(&k.as_str()))?;
    Some(format!("{name:?} is set by prefgen itself; it cannot be a variable"))
}

/// A chat message as templates see it.
#[derive(Debug, Clone, Serialize)]
pub struct Turn<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Which template this is, for errors (`the chat template of MODEL`).
    origin: String,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings templates
    /// reference; `origin` names it in errors.
    pub fn new(source: &str, bos_token: &str, eos_token: &str, origin: String) -> Result<ChatTemplate> {
        if source.trim().is_empty() {
            bail!("{origin} is empty");
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string()).map_err(|e| anyhow!("{origin} does not compile: {e}"))?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into(), origin })
    }

    /// Renders a conversation, with the assistant header when
    /// `add_generation_prompt`, and `kwargs` as further variables.
    pub fn render(&self, messages: &[Turn], add_generation_prompt: bool, kwargs: &Kwargs) -> Result<String> {
        let t = self.env.get_template("chat").expect("added in new()");
        let mut vars: BTreeMap<&str, Value> =
            kwargs.iter().map(|(k, v)| (k.as_str(), Value::from_serialize(v))).collect();
        for (name, value) in RESERVED.into_iter().zip([
            Value::from_serialize(messages),
            Value::from(add_generation_prompt),
            Value::from(self.bos_token.as_str()),
            Value::from(self.eos_token.as_str()),
        ]) {
            vars.insert(name, value);
        }
        t.render(vars)
            // `raise_exception('...')` arrives here as an invalid operation with its text.
            .map_err(|e| anyhow!("rendering {}: {e}", self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_python_style_templates() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n<{{ m['role'] }}>{{ m['content'] | trim }}{{ m.content.upper() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>", "the chat template t.jinja".into()).unwrap();
        let out = t.render(&[Turn { role: "user", content: " hi " }], true, &Kwargs::new()).unwrap();
        assert_eq!(out, "<s><user>hi HI \n<assistant>");
        let e = t.render(&[Turn { role: "tool", content: "x" }], false, &Kwargs::new()).unwrap_err();
        assert!(format!("{e:#}").contains("rendering the chat template t.jinja: invalid operation: bad role"), "{e:#}");
        let e = ChatTemplate::new(" \n", "<s>", "</s>", "the chat template t.jinja".into()).err().unwrap();
        assert_eq!(e.to_string(), "the chat template t.jinja is empty");
    }

    /// Keyword arguments reach the template as variables; one left out is
    /// undefined, so the template's default applies.
    #[test]
    fn kwargs_are_template_variables() {
        let src = "{% if enable_thinking is defined and enable_thinking is false %}off{% else %}on{% endif %}{{ n | default(1) }}";
        let t = ChatTemplate::new(src, "", "", "t".into()).unwrap();
        assert_eq!(t.render(&[], false, &Kwargs::new()).unwrap(), "on1");
        let kwargs = Kwargs::from([("enable_thinking".into(), false.into()), ("n".into(), 7.into())]);
        assert_eq!(t.render(&[], false, &kwargs).unwrap(), "off7");
    }
}
