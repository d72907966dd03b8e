//! Models loaded in this run, by their files, and the inference servers it
//! drives, by URL: loaded, connected or launched when a shard first needs
//! one (a run whose shards are all cached loads and launches nothing), once.
//! Launched servers are this run's: restarted when one dies mid-run,
//! stopped once their stage is done here, and when the run ends.

use crate::infer::chat::Chat;
use crate::infer::reward::{Kind, RewardModel};
use crate::infer::server::{self, Server};
use crate::infer::{Load, Policy};
use crate::launch::Launched;
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

/// A launched server's identity: the recipe key holding its command, the
/// command, and the model.
type LaunchId = (&'static str, String, PathBuf);

pub struct Models {
    policies: RefCell<HashMap<Files, Rc<Policy>>>,
    chats: RefCell<HashMap<Files, Rc<Chat>>>,
    servers: RefCell<HashMap<(&'static str, String), Rc<Server>>>,
    rewards: RefCell<HashMap<Files, Rc<RewardModel>>>,
    launched: RefCell<Vec<(LaunchId, Launched)>>,
    /// Where launched servers' output goes.
    logs: PathBuf,
}

impl Models {
    /// No model loaded yet; launched servers log under `logs`.
    pub fn new(logs: PathBuf) -> Models {
        Models {
            policies: RefCell::default(),
            chats: RefCell::default(),
            servers: RefCell::default(),
            rewards: RefCell::default(),
            launched: RefCell::default(),
            logs,
        }
    }

    /// The port of the server `launch` starts, started now unless it runs.
    fn launch(&self, launch: &server::Launch) -> Result<u16> {
        let id = (launch.key, launch.command.to_string(), launch.model.to_path_buf());
        if let Some((_, l)) = self.launched.borrow().iter().find(|(i, _)| *i == id) {
            return Ok(l.port());
        }
        // One stage's servers at a time: the policy's and the judge's would
        // share the GPU, and with several splits the stages alternate.
        let stage = launch.key.split('.').next().unwrap_or_default();
        let others: Vec<String> = self
            .launched
            .borrow()
            .iter()
            .map(|((key, _, _), _)| key.split('.').next().unwrap_or_default().to_string())
            .filter(|s| s != stage)
            .collect();
        for other in others {
            self.stop_launched(&other);
        }
        // One file per host and process: the workers of a job share a cache.
        let n = self.launched.borrow().len();
        let log = self.logs.join(format!(
            "{}-{}-{}{}.log",
            launch.key,
            crate::cache::lease::host_name(),
            std::process::id(),
            if n > 0 { format!("-{n}") } else { String::new() }
        ));
        let launched = Launched::start(launch.command, launch.model, launch.timeout, &log).context(launch.key)?;
        let port = launched.port();
        self.launched.borrow_mut().push((id, launched));
        Ok(port)
    }

    /// The base URL of `endpoint`: `${VAR}` read from the environment, and
    /// its server launched first (once) when it has a command.
    fn url(&self, endpoint: &server::Endpoint) -> Result<String> {
        let port = endpoint.launch.as_ref().map(|l| self.launch(l)).transpose()?;
        let Some(template) = endpoint.url else {
            let port = port.with_context(|| format!("{}: neither a URL nor a command to launch", endpoint.key))?;
            return Ok(format!("http://127.0.0.1:{port}/v1"));
        };
        let url = server::expand_env(template).context(endpoint.key)?;
        if !server::is_http(&url) {
            // The template, not what the environment gave: that may hold a password.
            bail!("{}: {template:?} does not give an http:// or https:// URL", endpoint.key);
        }
        Ok(match port {
            Some(port) => url.replace("{port}", &port.to_string()),
            None => url,
        })
    }

    /// `error` naming the server `endpoint` launched, if it launched one.
    fn naming_launched(&self, endpoint: &server::Endpoint, error: anyhow::Error) -> anyhow::Error {
        let Some(l) = &endpoint.launch else { return error };
        let id = (l.key, l.command.to_string(), l.model.to_path_buf());
        match self.launched.borrow().iter().find(|(i, _)| *i == id) {
            Some((_, launched)) => error.context(format!("{} {}", l.key, launched.describe())),
            None => error,
        }
    }

    /// After a shard failed with `error`: restarts the launched servers
    /// that died or stopped answering, so the shard is built again (Ok), or
    /// the error to fail with, naming the launched servers' logs.
    pub fn recover(&self, error: anyhow::Error) -> Result<()> {
        let mut launched = self.launched.borrow_mut();
        if launched.is_empty() {
            return Err(error);
        }
        let mut restarted = false;
        for ((key, _, _), l) in launched.iter_mut() {
            if l.healthy() {
                continue;
            }
            eprintln!("the server launched by {key} died or stopped answering ({error:#})");
            l.restart().with_context(|| format!("{error:#}")).context(*key)?;
            restarted = true;
        }
        if restarted {
            // Connected again (and checked again) on the next request.
            self.servers.borrow_mut().clear();
            return Ok(());
        }
        let logs: Vec<String> = launched.iter().map(|((key, _, _), l)| format!("{key}: {}", l.describe())).collect();
        Err(error.context(format!("launched server {}", logs.join("; "))))
    }

    /// Stops the servers launched for `stage` (its keys' section).
    pub fn stop_launched(&self, stage: &str) {
        let mut launched = self.launched.borrow_mut();
        let before = launched.len();
        launched.retain(|((key, _, _), _)| key.split('.').next() != Some(stage));
        if launched.len() != before {
            self.servers.borrow_mut().clear();
        }
    }
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

    fn server(&self, endpoint: &server::Endpoint, options: &server::Options) -> Result<Rc<Server>> {
        let url = self.url(endpoint)?;
        // One connection per stage: a server checked to serve the policy is
        // not thereby checked to serve the judge.
        let id = (options.section, url);
        if let Some(s) = self.servers.borrow().get(&id) {
            return Ok(s.clone());
        }
        let server = Rc::new(Server::connect(&id.1, options).map_err(|e| self.naming_launched(endpoint, e))?);
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
