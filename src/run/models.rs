//! Models loaded in this run, by their files, and the inference servers it
//! drives, by URL: loaded or connected when a shard first needs one (a run
//! whose shards are all cached loads nothing), once.

use crate::infer::chat::Chat;
use crate::infer::reward::{Kind, RewardModel};
use crate::infer::server::{self, Server};
use crate::infer::{Load, Policy};
use crate::recipe;
use crate::stages;
use anyhow::{Context, Result, bail};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// What a failed load was: `generate.model m (with generate.chat_template t)`.
fn loading(model_key: &str, model: &Path, template_key: &str, template: Option<&Path>) -> String {
    match template {
        Some(t) => format!("{model_key} {} (with {template_key} {})", model.display(), t.display()),
        None => format!("{model_key} {}", model.display()),
    }
}

/// A loaded model's files: the model and the chat template replacing its own.
type Files = (PathBuf, Option<PathBuf>);

#[derive(Default)]
pub struct Models {
    policies: RefCell<HashMap<Files, Rc<Policy>>>,
    chats: RefCell<HashMap<Files, Rc<Chat>>>,
    servers: RefCell<HashMap<(&'static str, String), Rc<Server>>>,
    rewards: RefCell<HashMap<Files, Rc<RewardModel>>>,
}

impl stages::Models for Models {
    fn policy(&self, model: &Path, chat_template: Option<&Path>) -> Result<Rc<Policy>> {
        let files = (model.to_path_buf(), chat_template.map(Path::to_path_buf));
        if let Some(p) = self.policies.borrow().get(&files) {
            return Ok(p.clone());
        }
        eprintln!("loading {}", model.display());
        let load = Load { chat_template, ..Load::default() };
        let policy = Policy::load(model, &load)
            .with_context(|| loading(recipe::generate::model, model, recipe::generate::chat_template, chat_template))?;
        let policy = Rc::new(policy);
        self.policies.borrow_mut().insert(files, policy.clone());
        Ok(policy)
    }

    fn chat(&self, section: &str, model: &Path, chat_template: Option<&Path>) -> Result<Rc<Chat>> {
        let files = (model.to_path_buf(), chat_template.map(Path::to_path_buf));
        if let Some(c) = self.chats.borrow().get(&files) {
            return Ok(c.clone());
        }
        let (model_key, template_key) = (format!("{section}.model"), format!("{section}.chat_template"));
        let chat = Chat::load(model, chat_template)
            .with_context(|| loading(&model_key, model, &template_key, chat_template))?;
        let chat = Rc::new(chat);
        self.chats.borrow_mut().insert(files, chat.clone());
        Ok(chat)
    }

    fn server(&self, url: &str, options: &server::Options) -> Result<Rc<Server>> {
        let template = url;
        let key = format!("{}.server", options.section);
        let url = server::expand_env(template).with_context(|| key.clone())?;
        if !server::is_http(&url) {
            // The template, not what the environment gave: that may hold a password.
            bail!("{key}: {template:?} does not give an http:// or https:// URL");
        }
        // One connection per stage: a server checked to serve the policy is
        // not thereby checked to serve the judge.
        let id = (options.section, url);
        if let Some(s) = self.servers.borrow().get(&id) {
            return Ok(s.clone());
        }
        let server = Rc::new(Server::connect(&id.1, options)?);
        let doing = if options.section == recipe::Generate::SECTION { "sampling" } else { "judging" };
        eprintln!("{doing} through {} at {}; {}", server.engine, server.shown, server.checked);
        self.servers.borrow_mut().insert(id, server.clone());
        Ok(server)
    }

    fn rubric(&self, path: Option<&Path>) -> Result<Option<String>> {
        path.map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read {}", recipe::annotate::judge_rubric, p.display()))
        })
        .transpose()
    }

    fn reward(
        &self,
        model: &Path,
        kind: Option<Kind>,
        chat_template: Option<&Path>,
        rubric: Option<&Path>,
    ) -> Result<Rc<RewardModel>> {
        let files = (model.to_path_buf(), chat_template.map(Path::to_path_buf));
        if let Some(m) = self.rewards.borrow().get(&files) {
            return Ok(m.clone());
        }
        eprintln!("loading {}", model.display());
        let rubric = stages::Models::rubric(self, rubric)?;
        let load = Load { chat_template, ..Load::default() };
        let rm = RewardModel::load(model, kind, rubric, &load)
            .with_context(|| loading(recipe::annotate::model, model, recipe::annotate::chat_template, chat_template))?;
        let rm = Rc::new(rm);
        self.rewards.borrow_mut().insert(files, rm.clone());
        Ok(rm)
    }
}
