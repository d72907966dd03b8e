//! The book's generated sections (the recipe keys, the model families, the
//! command reference): each lies between two markers in a page under
//! `docs/src/` and is checked against what the code renders, so the two
//! cannot drift. `PREFGEN_UPDATE_DOCS=1 cargo test --lib docs` rewrites them.

mod commands;

use std::path::Path;

/// Asserts that the section `name` of `page` (a path under the crate root;
/// between `<!-- {name}: rendered from {source} ... -->` and
/// `<!-- end of {name} -->`) is `want`; with `PREFGEN_UPDATE_DOCS` set,
/// rewrites it instead.
fn check_section(page: &str, name: &str, source: &str, want: &str) {
    // The sections' tests run in parallel: one rewrite at a time, so none
    // writes back a page read before another's rewrite.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(page);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
    let start_marker =
        format!("<!-- {name}: rendered from {source} by `PREFGEN_UPDATE_DOCS=1 cargo test --lib docs` -->\n");
    let end_marker = format!("<!-- end of {name} -->");
    let start =
        text.find(&start_marker).unwrap_or_else(|| panic!("{page} has no {start_marker:?}")) + start_marker.len();
    let end = text[start..].find(&end_marker).unwrap_or_else(|| panic!("{page} has no {end_marker:?}")) + start;
    if std::env::var_os("PREFGEN_UPDATE_DOCS").is_some() {
        std::fs::write(&path, format!("{}{want}{}", &text[..start], &text[end..])).unwrap();
    } else {
        assert!(
            text[start..end] == *want,
            "{page}: the {name} section is stale: run `PREFGEN_UPDATE_DOCS=1 cargo test --lib docs`"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::check_section;

    /// The key table is the one the recipe sections' declarations render.
    #[test]
    fn recipe_keys_are_rendered_from_the_sections() {
        check_section("docs/src/recipes.md", "recipe keys", "src/recipe/mod.rs", &crate::recipe::reference_table());
    }

    /// The model table is the one the families' descriptions render.
    #[test]
    fn model_families_are_rendered_from_the_families() {
        let table = crate::infer::models::family::model_table();
        check_section("docs/src/models.md", "model families", "src/infer/models/family.rs", &table);
    }

    /// The command reference is the one clap's definitions render.
    #[test]
    fn command_reference_is_rendered_from_the_command_line() {
        check_section("docs/src/commands.md", "command reference", "src/cli/", &super::commands::reference());
    }
}
