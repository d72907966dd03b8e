//! What a user reads when something is wrong: the cause kept (the OS error,
//! a template's own words), the path or key named, the real limit given, the
//! advice not already taken; and a closed stdout ending a command quietly.

mod common;

use common::*;

/// `prefgen plan R | head` closes the pipe early: prefgen ends as `cat`
/// would (quietly, by SIGPIPE or with success), never with a panic.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let p = Project::new();
    let r = p.write("r.toml", &simpo_recipe());
    p.ok(&["run", r.to_str().unwrap()]);
    for args in [vec!["plan", r.to_str().unwrap()], vec!["cache", "verify"]] {
        // The read end is closed before prefgen starts: its first line meets EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = p.command(&args).stdout(writer).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{args:?} ended with {:?}: {err}",
            out.status
        );
    }
}

#[test]
fn a_chat_template_that_raises_is_quoted_and_named() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    p.write("raise.jinja", "{{ raise_exception('Conversation roles must alternate user/assistant') }}");
    let args = ["run", r.to_str().unwrap(), "generate", "--set", "generate.chat_template=raise.jinja"];
    fails(&p, &args, &["the chat template raise.jinja", "Conversation roles must alternate user/assistant"]);
    // One line: not the template engine's multi-line source listing.
    let err = p.prefgen(&args).stderr();
    assert!(err.trim_end().lines().last().is_some_and(|l| l.starts_with("error:")), "{err}");
}

#[test]
fn an_empty_chat_template_is_called_empty() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    p.write("empty.jinja", "\n");
    let line = fails(
        &p,
        &["run", r.to_str().unwrap(), "generate", "--set", "generate.chat_template=empty.jinja"],
        &["the chat template empty.jinja is empty"],
    );
    assert!(!line.contains("too long"), "{line}");
}

/// A FIFO would block a read forever and /dev/zero never ends: each is
/// named for what it is, as is a symlink loop, before anything is read.
#[test]
fn a_prompt_source_that_is_not_a_file_is_named_for_what_it_is() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    let r = r.to_str().unwrap();
    let fifo = p.path("fifo.jsonl");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink(p.path("loop.jsonl"), p.path("loop.jsonl")).unwrap();
    for (source, why) in [
        ("fifo.jsonl", "fifo.jsonl is a named pipe (FIFO), not a file or a folder"),
        ("/dev/zero", "/dev/zero is a device, not a file or a folder"),
        ("loop.jsonl", "Too many levels of symbolic links"),
    ] {
        let line = fails(&p, &["plan", r, "--set", &format!("prompts.dataset={source}")], &[source, why]);
        assert!(!line.contains("does not exist"), "{line}");
    }
}

/// With `overflow = "truncate"` already set, the advice is to raise
/// `max_length`, not to set what is set.
#[test]
fn a_max_length_nothing_fits_in_advises_only_what_is_not_set() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    let line = fails(
        &p,
        &["run", r.to_str().unwrap(), "--set", "annotate.max_length=1"],
        &["every one of the", "annotate.max_length = 1 tokens", "raise annotate.max_length"],
    );
    assert!(!line.contains("set annotate.overflow"), "{line}");
}

#[test]
fn an_integer_out_of_range_is_given_its_limit() {
    let p = Project::new();
    let r = tiny_recipe(&p, 2, "");
    let r = r.to_str().unwrap();
    fails(&p, &["plan", r, "--set", "generate.max_tokens=99999999999"], &["generate.max_tokens", "4294967295"]);
    fails(&p, &["plan", r, "--set", "generate.seeds=[1, -1]"], &["generate.seeds", "0 to 9223372036854775807"]);
}

/// Cache folders in the way: the error names the folder and keeps the OS's
/// words, instead of "cannot write to the cache: File exists".
#[test]
fn a_cache_that_cannot_be_written_names_the_folder_and_the_os_error() {
    let p = Project::new();
    let r = p.write("r.toml", &simpo_recipe());
    let r = r.to_str().unwrap();
    std::fs::create_dir_all(p.path("cache")).unwrap();
    p.write("cache/locks", "not a folder");
    fails(&p, &["run", r], &["cache/locks", "File exists"]);
    std::fs::remove_file(p.path("cache/locks")).unwrap();
    let _ = std::fs::remove_dir_all(p.path("cache/tmp"));
    p.write("cache/tmp", "not a folder");
    fails(&p, &["run", r], &["cache/tmp", "File exists"]);
}

/// A remote bucket that does not exist is said so, in one line, by `plan`
/// (which used to look through it silently and call everything stale).
#[test]
fn a_bucket_that_does_not_exist_is_named() {
    let s3 = S3Server::start("team");
    let p = Project::new();
    let r = p.write("r.toml", &simpo_recipe());
    let mut c = p.command(&["plan", r.to_str().unwrap(), "--remote", "s3://no-such-bucket/prefgen"]);
    c.envs(s3.env());
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let line =
        err.lines().find(|l| l.contains("s3://no-such-bucket/prefgen failed")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("NoSuchBucket: The specified bucket does not exist"), "{line}");
    assert!(!err.contains("<?xml"), "{err}");
}
