//! The README and the book (`docs/src/`) as a reader meets them: every
//! relative link and `#anchor` leads somewhere, every page is in the book's
//! table of contents, and every shell block marked ```` ```sh example ```` runs
//! against the prefgen just built, so a renamed flag fails here instead of
//! in a user's terminal.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The README and every page of the book.
fn pages() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut book: Vec<PathBuf> = std::fs::read_dir(root().join("docs/src"))
        .expect("docs/src exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    book.sort();
    out.extend(book);
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// A fenced code block: its info string (` ```sh example `: `sh example`),
/// first line number (1-based) and text.
struct Block {
    info: String,
    line: usize,
    text: String,
}

/// The page's lines outside fenced code blocks (with their numbers), and its
/// fenced blocks.
fn split(text: &str) -> (Vec<(usize, &str)>, Vec<Block>) {
    let (mut prose, mut blocks) = (Vec::new(), Vec::new());
    let mut open: Option<(String, Block)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let fence: String = trimmed.chars().take_while(|c| *c == '`' || *c == '~').collect();
        match &mut open {
            Some((opener, block)) => {
                if fence.len() >= opener.len()
                    && fence.starts_with(&opener[..1])
                    && trimmed[fence.len()..].trim().is_empty()
                {
                    blocks.push(open.take().unwrap().1);
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
            None if fence.len() >= 3 && !(fence.starts_with('`') && fence.contains('~')) => {
                let info = trimmed[fence.len()..].trim().to_string();
                open = Some((fence, Block { info, line: i + 2, text: String::new() }));
            }
            None => prose.push((i + 1, line)),
        }
    }
    assert!(open.is_none(), "a code block is never closed");
    (prose, blocks)
}

/// `line` without its inline code spans (a link inside backticks is text).
fn without_code(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find('`') {
        out.push_str(&rest[..at]);
        let run = rest[at..].chars().take_while(|c| *c == '`').count();
        let after = &rest[at + run..];
        let closing = "`".repeat(run);
        match after.find(&closing) {
            Some(end) => rest = &after[end + run..],
            None => return out + &rest[at..],
        }
    }
    out + rest
}

/// The targets of the line's inline links, `[text](target "title")`.
fn links(line: &str) -> Vec<String> {
    let line = without_code(line);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after.find(')').unwrap_or(after.len());
        out.push(after[..end].split_whitespace().next().unwrap_or("").to_string());
        rest = &after[end..];
    }
    out
}

/// The anchors mdBook gives the page's headings: the heading's text
/// (links and code marks removed), lowercase, spaces to dashes, other
/// punctuation dropped; a repeated one gets `-1`, `-2`, ...
fn anchors(text: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (_, line) in split(text).0 {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let mut heading = line[hashes..].trim().trim_end_matches('#').trim().to_string();
        // [text](target) reads as text.
        while let (Some(open), Some(mid)) = (heading.find('['), heading.find("](")) {
            let close = heading[mid..].find(')').map_or(heading.len(), |c| mid + c + 1);
            heading = format!("{}{}{}", &heading[..open], &heading[open + 1..mid], &heading[close..]);
        }
        let id: String = heading
            .chars()
            .filter_map(|c| match c {
                c if c.is_alphanumeric() || c == '_' || c == '-' => Some(c.to_lowercase().next().unwrap_or(c)),
                c if c.is_whitespace() => Some('-'),
                _ => None,
            })
            .collect();
        let n = seen.entry(id.clone()).or_insert(0);
        out.push(if *n == 0 { id.clone() } else { format!("{id}-{n}") });
        *n += 1;
    }
    out
}

/// Every broken relative link of `page`, as `page:line: what`.
fn broken_links(page: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(page).unwrap();
    let book = root().join("docs/src");
    let mut out = Vec::new();
    for (n, line) in split(&text).0 {
        for target in links(line) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let at = format!("{}:{n}: {target}", rel(page));
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() { page.to_path_buf() } else { page.parent().unwrap().join(path) };
            let Ok(file) = file.canonicalize() else {
                out.push(format!("{at}: no such file"));
                continue;
            };
            // The book is built from docs/src alone: a page that links out of it
            // links to nothing once rendered.
            if page.starts_with(&book) && !file.starts_with(book.canonicalize().unwrap()) {
                out.push(format!("{at}: outside docs/src, which the book is built from"));
                continue;
            }
            if !anchor.is_empty() {
                let ids = std::fs::read_to_string(&file).map(|t| anchors(&t)).unwrap_or_default();
                if !ids.iter().any(|id| id == anchor) {
                    out.push(format!("{at}: no heading has the anchor #{anchor}"));
                }
            }
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let broken: Vec<String> = pages().iter().flat_map(|p| broken_links(p)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The checker itself: a missing page and a missing anchor are caught, an
/// anchor as mdBook writes it is found.
#[test]
fn the_link_checker_catches_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("a.md");
    std::fs::write(
        &page,
        "# A page\n\n## `generate.launch`: servers, launched!\n\n[ok](#generatelaunch-servers-launched) \
         [ok](a.md#a-page) `[code](nowhere.md)`\n[bad](b.md) [bad](#nothing)\n```\n[in a block](c.md)\n```\n",
    )
    .unwrap();
    let broken = broken_links(&page);
    assert_eq!(broken.len(), 2, "{broken:#?}");
    assert!(broken[0].ends_with("b.md: no such file") && broken[1].ends_with("no heading has the anchor #nothing"));
}

/// The README stays a page a newcomer reads in two minutes, and opens with
/// the two commands: the demo end to end, and the tests.
#[test]
fn the_readme_is_short_and_opens_with_the_demo_and_the_tests() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 250, "README.md has {lines} lines; at most 250 (the rest belongs in docs/src/)");
    let first: Vec<&str> = readme.lines().take(2).map(str::trim).collect();
    assert!(first[0].starts_with("make demo") && first[1].starts_with("make test"), "{first:?}");
}

#[test]
fn every_page_is_in_the_summary() {
    let summary = std::fs::read_to_string(root().join("docs/src/SUMMARY.md")).unwrap();
    let listed: Vec<String> = split(&summary).0.iter().flat_map(|(_, l)| links(l)).collect();
    for page in pages().iter().skip(1) {
        let name = page.file_name().unwrap().to_string_lossy().to_string();
        assert!(name == "SUMMARY.md" || listed.contains(&name), "docs/src/{name} is not in SUMMARY.md");
    }
}

/// The blocks marked to run: ```` ```sh example ````.
fn examples(page: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(page).unwrap();
    split(&text).1.into_iter().filter(|b| b.info.split([' ', ',']).any(|w| w == "example")).collect()
}

/// How long one example may take.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `script` with bash (`-euo pipefail`: any failing command fails it)
/// in a scratch folder holding a copy of `recipes/` and links to `models/`
/// and `tests/`, with the prefgen this test suite built first on PATH;
/// `Err` with what it printed when it fails or outlives [`LIMIT`].
fn run_example(script: &str) -> Result<(), String> {
    let scratch = tempfile::tempdir().unwrap();
    copy_dir(&root().join("recipes"), &scratch.path().join("recipes"));
    for linked in ["models", "tests"] {
        std::os::unix::fs::symlink(root().join(linked), scratch.path().join(linked)).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_prefgen")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // One file for both streams, in the order they were written.
    let log = scratch.path().join(".example.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(scratch.path())
        .env("PATH", path)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("PREFGEN_CACHE")
        .env_remove("PREFGEN_REMOTE")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        // Its own process group, so a timeout stops all it started.
        .process_group(0)
        .spawn()
        .expect("bash starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            // SAFETY: kill(2) on the process group this test created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The end says what failed.
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = output.lines().collect();
    let output = lines[lines.len().saturating_sub(40)..].join("\n");
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!("{s}:\n{output}")),
        None => Err(format!("still running after {LIMIT:?}:\n{output}")),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() { copy_dir(&p, &dest) } else { std::fs::copy(&p, &dest).map(drop).unwrap() }
    }
}

#[test]
fn every_example_runs() {
    let mut count = 0;
    let mut failed = Vec::new();
    for page in pages() {
        for block in examples(&page) {
            assert!(
                block.info.split([' ', ',']).next() == Some("sh"),
                "{}:{}: an example must be a ```sh block",
                rel(&page),
                block.line
            );
            count += 1;
            let started = Instant::now();
            let result = run_example(&block.text);
            eprintln!("{}:{}: {:.1} s", rel(&page), block.line, started.elapsed().as_secs_f64());
            if let Err(e) = result {
                failed.push(format!("{}:{}:\n{}\n{e}", rel(&page), block.line, block.text));
            }
        }
    }
    assert!(count >= 8, "only {count} examples found: is the marker still ```sh example?");
    assert!(!examples(&root().join("README.md")).is_empty(), "the README has no example");
    assert!(failed.is_empty(), "examples failed:\n\n{}", failed.join("\n\n"));
}

/// A flag the command line no longer has fails its example.
#[test]
fn an_example_with_a_wrong_flag_fails() {
    let err = run_example("prefgen plan recipes/demo.toml --no-such-flag\n").unwrap_err();
    assert!(err.contains("--no-such-flag"), "{err}");
    assert!(run_example("prefgen plan recipes/demo.toml\n").is_ok());
}
