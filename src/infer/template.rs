//! Chat templates: a model's own Jinja template, rendered as `transformers`'
//! `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`).

use anyhow::{Result, anyhow, bail};
use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

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

    /// Renders a conversation, with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Turn], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").expect("added in new()");
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
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
        let out = t.render(&[Turn { role: "user", content: " hi " }], true).unwrap();
        assert_eq!(out, "<s><user>hi HI \n<assistant>");
        let e = t.render(&[Turn { role: "tool", content: "x" }], false).unwrap_err();
        assert!(format!("{e:#}").contains("rendering the chat template t.jinja: invalid operation: bad role"), "{e:#}");
        let e = ChatTemplate::new(" \n", "<s>", "</s>", "the chat template t.jinja".into()).err().unwrap();
        assert_eq!(e.to_string(), "the chat template t.jinja is empty");
    }
}
