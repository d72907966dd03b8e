//! The README's generated sections (the recipe keys, the model families):
//! each lies between two markers and is checked against what the code
//! renders, so the two cannot drift.

use std::path::Path;

/// Asserts that the README's section `name` (between `<!-- {name}: rendered
/// from {source} ... -->` and `<!-- end of {name} -->`) is `want`; with
/// `PREFGEN_UPDATE_README` set, rewrites it instead.
pub(crate) fn check_section(name: &str, source: &str, want: &str) {
    // The sections' tests run in parallel: one rewrite at a time, so none
    // writes back a README read before another's rewrite.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start_marker =
        format!("<!-- {name}: rendered from {source} by `PREFGEN_UPDATE_README=1 cargo test --lib readme` -->\n");
    let end_marker = format!("<!-- end of {name} -->");
    let start =
        readme.find(&start_marker).unwrap_or_else(|| panic!("README has no {start_marker:?}")) + start_marker.len();
    let end = readme[start..].find(&end_marker).unwrap_or_else(|| panic!("README has no {end_marker:?}")) + start;
    if std::env::var_os("PREFGEN_UPDATE_README").is_some() {
        std::fs::write(&path, format!("{}{want}{}", &readme[..start], &readme[end..])).unwrap();
    } else {
        assert!(
            readme[start..end] == *want,
            "README's {name} are stale: run `PREFGEN_UPDATE_README=1 cargo test --lib readme`"
        );
    }
}
