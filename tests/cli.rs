//! The command itself, as an installed `prefgen` shows it: `--version`
//! naming the build and the CPU's kernel, and the shell completion scripts.

mod common;

use clap::CommandFactory;
use common::*;
use prefgen::infer::qmatmul::{KERNEL_VAR, Kernel};

/// The lines `prefgen --version` prints, with `PREFGEN_INT8_KERNEL` as given.
fn version(kernel_var: Option<&str>) -> Vec<String> {
    let p = Project::new();
    let mut c = p.command(&["--version"]);
    match kernel_var {
        Some(v) => c.env(KERNEL_VAR, v),
        None => c.env_remove(KERNEL_VAR),
    };
    let out = Run(c.output().expect("prefgen runs"));
    assert_eq!(out.code(), Some(0), "{}", out.stderr());
    out.stdout().lines().map(str::to_string).collect()
}

/// This checkout's commit as `--version` abbreviates it, or `unknown` where
/// the source is not a git checkout (an sdist).
fn head() -> String {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git runs");
    if out.status.success() { String::from_utf8(out.stdout).unwrap().trim().to_string() } else { "unknown".into() }
}

#[test]
fn version_names_the_commit_the_features_and_this_cpus_kernel() {
    let lines = version(None);
    assert_eq!(lines[0], format!("prefgen {}", env!("CARGO_PKG_VERSION")), "{lines:?}");
    let commit = format!("commit: {}", head());
    assert!(lines[1] == commit || lines[1] == format!("{commit}-modified"), "{lines:?}, want {commit}");
    let features = if cfg!(feature = "cuda") { "features: cuda" } else { "features: none (CPU only)" };
    assert_eq!(lines[2], features, "{lines:?}");
    // The kernel the library chooses on this CPU, by the same function.
    let best = Kernel::ALL.into_iter().find(|k| k.runs_here()).expect("scalar runs everywhere");
    assert_eq!(lines[3], format!("int8 kernel: {} (the fastest this CPU has)", best.name()), "{lines:?}");
    assert_eq!(lines.len(), 4, "{lines:?}");

    let chosen = version(Some("scalar"));
    assert_eq!(chosen[3], format!("int8 kernel: scalar (set by {KERNEL_VAR})"), "{chosen:?}");
    // A kernel this CPU cannot run is named, and --version still answers.
    let wrong = version(Some("sse9"));
    assert!(wrong[3].starts_with("int8 kernel: none: ") && wrong[3].contains("sse9"), "{wrong:?}");
}

/// `prefgen completions bash` is a script bash accepts that completes the
/// real subcommands (and their subcommands), from any folder and with a
/// broken prefgen.toml beside it: it needs no configuration.
#[test]
fn completions_complete_the_real_subcommands() {
    let p = Project::new();
    p.write("prefgen.toml", "not toml [");
    let script = |shell: &str| {
        let run = p.prefgen(&["completions", shell]);
        assert_eq!(run.code(), Some(0), "completions {shell}: {}", run.stderr());
        run.stdout()
    };
    let cli = prefgen::cli::Cli::command();
    let subcommands: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).collect();
    assert!(subcommands.contains(&"completions") && subcommands.contains(&"run"), "{subcommands:?}");
    for shell in ["bash", "zsh", "fish"] {
        let text = script(shell);
        for name in &subcommands {
            assert!(text.contains(name), "the {shell} script lacks `{name}`");
        }
    }

    let bash = p.write("prefgen.bash", &script("bash"));
    let syntax = std::process::Command::new("bash").arg("-n").arg(&bash).output().expect("bash runs");
    assert!(syntax.status.success(), "bash -n: {}", String::from_utf8_lossy(&syntax.stderr));
    // What bash offers at `prefgen <TAB>` and `prefgen cache <TAB>`.
    let complete = |words: &str| {
        let shell = format!(
            "source {}; COMP_WORDS=({words} ''); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_LINE='{words} '; \
             COMP_POINT=${{#COMP_LINE}}; _prefgen prefgen '' \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[@]}}\"",
            bash.display()
        );
        let out = std::process::Command::new("bash").args(["-c", &shell]).output().expect("bash runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().split_whitespace().map(str::to_string).collect::<Vec<_>>()
    };
    let top = complete("prefgen");
    for name in &subcommands {
        assert!(top.iter().any(|w| w == name), "`prefgen <TAB>` offers {top:?}, not {name}");
    }
    let cache = cli.find_subcommand("cache").expect("a cache command");
    let offered = complete("prefgen cache");
    for name in cache.get_subcommands().map(|c| c.get_name()) {
        assert!(offered.iter().any(|w| w == name), "`prefgen cache <TAB>` offers {offered:?}, not {name}");
    }
}
