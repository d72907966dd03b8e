//! How a recipe section is declared: every key once, with its doc comment,
//! its default and its role (whether and how it enters action keys), so
//! that keys, the book's key table and `--set` all derive from one place.

/// How a recipe key bears on what prefgen builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its value enters the action key of its section's stage.
    Key,
    /// It names what is read from outside (a file, a model, a dataset):
    /// what is read enters the key, not the name.
    Source(&'static str),
    /// It decides which nodes exist; each node's own part of it is in its key.
    Shape(&'static str),
    /// It cannot change an output, so it is not in any key.
    Free(&'static str),
}

/// One recipe key as its section declares it.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// `section.key`, as `--set` and messages name it.
    pub key: &'static str,
    /// The doc comment beside the field.
    pub doc: &'static str,
    /// The default as the book's key table shows it; None: the default value itself.
    pub default: Option<&'static str>,
    pub role: Role,
}

/// `_` (the default is shown as its value) or a text.
macro_rules! shown_default {
    (_) => {
        None
    };
    ($text:literal) => {
        Some($text)
    };
}
pub(crate) use shown_default;

/// Declares a recipe section: the struct (serde, `deny_unknown_fields`, every
/// key defaulted), its `Default`, `FIELDS` (keys, docs, defaults, roles),
/// `keyed()` (the values of its `Key` fields by recipe key, empty tables
/// left out), and a module
/// named after the section with one constant per key (`generate::model` is
/// `"generate.model"`), so code names a key without typing it.
///
/// ```text
/// /// doc comment
/// field: Type = default_value, _ or "default as shown", Role;
/// ```
macro_rules! section {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident in $module:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr, $shown:tt, $role:expr;
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }

        impl $name {
            /// The section's name in a recipe.
            pub const SECTION: &'static str = stringify!($module);

            /// Every key of the section, in declaration order.
            pub const FIELDS: &'static [$crate::recipe::section::Field] = &[
                $(
                    $crate::recipe::section::Field {
                        key: concat!(stringify!($module), ".", stringify!($field)),
                        doc: concat!($($doc, "\n"),*),
                        default: $crate::recipe::section::shown_default!($shown),
                        role: {
                            #[allow(unused_imports)]
                            use $crate::recipe::section::Role::*;
                            $role
                        },
                    },
                )*
            ];

            /// The values of the section's `Key` fields, by recipe key: what
            /// its stage's action key holds of it.
            pub fn keyed(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
                let mut out = std::collections::BTreeMap::new();
                $(
                    if matches!({ #[allow(unused_imports)] use $crate::recipe::section::Role::*; $role }, $crate::recipe::section::Role::Key) {
                        let value = serde_json::to_value(&self.$field).expect("recipe values serialise");
                        // An empty table sets nothing, so a table-valued key
                        // added later keeps every key made before it.
                        if value.as_object().is_none_or(|t| !t.is_empty()) {
                            out.insert(concat!(stringify!($module), ".", stringify!($field)).to_string(), value);
                        }
                    }
                )*
                out
            }
        }

        #[doc = concat!("The keys of `[", stringify!($module), "]`, named as `--set` names them.")]
        #[allow(non_upper_case_globals)]
        pub mod $module {
            $( pub const $field: &str = concat!(stringify!($module), ".", stringify!($field)); )*
        }
    };
}
pub(crate) use section;
