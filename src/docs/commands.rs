//! The command reference, rendered as Markdown from clap's own definitions
//! (`crate::cli::Cli`), so a flag's documentation is written once, where the
//! flag is defined, and the book says what `--help` says.

use clap::{Arg, Command, CommandFactory};

/// The whole reference: a table of the commands, then each command's usage
/// and arguments.
pub(super) fn reference() -> String {
    let mut root = crate::cli::Cli::command();
    // Building sets every subcommand's full name (`prefgen cache gc`) and
    // propagates the global options.
    root.build();
    let mut all = Vec::new();
    walk(&root, &mut all);
    let mut out = String::from("| command | does |\n|---|---|\n");
    for cmd in &all {
        let name = full_name(cmd);
        let about = cmd.get_about().map(|a| one_line(&a.to_string())).unwrap_or_default();
        out.push_str(&format!("| [`{name}`](#{}) | {about} |\n", name.replace(' ', "-")));
    }
    for cmd in &all {
        out.push('\n');
        section(cmd, &mut out);
    }
    out
}

/// `cmd` and every subcommand under it, depth first, `help` aside.
fn walk<'a>(cmd: &'a Command, out: &mut Vec<&'a Command>) {
    out.push(cmd);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help" && !s.is_hide_set()) {
        walk(sub, out);
    }
}

fn full_name(cmd: &Command) -> String {
    cmd.get_bin_name().unwrap_or(cmd.get_name()).to_string()
}

/// Help text on one line: Markdown list items and table cells are lines.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn section(cmd: &Command, out: &mut String) {
    let root = cmd.get_bin_name().is_none_or(|n| !n.contains(' '));
    out.push_str(&format!("### `{}`\n\n", full_name(cmd)));
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        out.push_str(&format!("{}\n\n", one_line(&about.to_string())));
    }
    out.push_str(&format!("```text\n{}\n```\n", cmd.clone().render_usage()));
    // The global options are listed once, with the command that defines them.
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| a.get_id() != "help" && !a.is_hide_set() && (root || !a.is_global_set()))
        .collect();
    if !args.is_empty() {
        out.push('\n');
    }
    for arg in args {
        out.push_str(&format!("- `{}`", spec(arg)));
        if let Some(help) = arg.get_long_help().or(arg.get_help()) {
            out.push_str(&format!(": {}", one_line(&help.to_string())));
        }
        let mut notes = Vec::new();
        if arg.is_global_set() {
            notes.push("every command".to_string());
        }
        if let Some(env) = arg.get_env().filter(|_| !arg.is_hide_env_set()) {
            notes.push(format!("env: `{}`", env.to_string_lossy()));
        }
        if arg.get_action().takes_values() {
            let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into()).collect();
            if !defaults.is_empty() && !arg.is_hide_default_value_set() {
                notes.push(format!("default: `{}`", defaults.join(" ")));
            }
            let values: Vec<String> = arg.get_possible_values().iter().map(|v| format!("`{}`", v.get_name())).collect();
            if !values.is_empty() && !arg.is_hide_possible_values_set() {
                notes.push(format!("one of {}", values.join(", ")));
            }
        }
        if !notes.is_empty() {
            out.push_str(&format!(" ({})", notes.join("; ")));
        }
        out.push('\n');
    }
}

/// How the argument is written: `<RECIPE>`, `[TARGETS]...`, `-o, --out <FILE>`.
fn spec(arg: &Arg) -> String {
    match (arg.get_short(), arg.get_long()) {
        (Some(short), Some(_)) => format!("-{short}, {arg}"),
        _ => arg.to_string(),
    }
}
