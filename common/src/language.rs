//! The one alias table: every place a language name enters the system goes through
//! [`Language::parse`], so `py`, `python3` and `Python` all mean [`Language::Python`].

use std::{fmt, str::FromStr};

/// A language the cluster knows how to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Language {
    Python,
    Bash,
    Sh,
    Javascript,
    Ruby,
    Perl,
    Rust,
    Java,
    Go,
    C,
}

/// A language name that is not in the alias table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown language '{name}'; known languages: {}",
    Language::known_names()
)]
pub struct UnknownLanguage {
    /// The name as it was given.
    pub name: String,
}

impl Language {
    /// Every language, in the order tables list them.
    pub const ALL: [Language; 10] = [
        Language::Python,
        Language::Bash,
        Language::Sh,
        Language::Javascript,
        Language::Ruby,
        Language::Perl,
        Language::Rust,
        Language::Java,
        Language::Go,
        Language::C,
    ];

    /// The languages sessions hold warm interpreters for.
    pub const IN_SESSIONS: [Language; 3] = [Language::Python, Language::Javascript, Language::Bash];

    /// Whether sessions hold an interpreter for this language.
    pub fn in_sessions(self) -> bool {
        Self::IN_SESSIONS.contains(&self)
    }

    /// The names of the languages sessions hold, for messages.
    pub fn session_names() -> String {
        Self::IN_SESSIONS
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The canonical name, used on the wire and in output.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Bash => "bash",
            Language::Sh => "sh",
            Language::Javascript => "javascript",
            Language::Ruby => "ruby",
            Language::Perl => "perl",
            Language::Rust => "rust",
            Language::Java => "java",
            Language::Go => "go",
            Language::C => "c",
        }
    }

    /// Every name accepted for this language, canonical name first.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Language::Python => &["python", "py", "python3", "py3"],
            Language::Bash => &["bash", "shell", "zsh"],
            Language::Sh => &["sh", "posix-sh", "dash"],
            Language::Javascript => &["javascript", "js", "node", "nodejs", "mjs"],
            Language::Ruby => &["ruby", "rb"],
            Language::Perl => &["perl", "pl"],
            Language::Rust => &["rust", "rs"],
            Language::Java => &["java"],
            Language::Go => &["go", "golang"],
            Language::C => &["c"],
        }
    }

    /// File extension of a source file in this language.
    pub fn extension(self) -> &'static str {
        match self {
            Language::Python => "py",
            Language::Bash | Language::Sh => "sh",
            Language::Javascript => "js",
            Language::Ruby => "rb",
            Language::Perl => "pl",
            Language::Rust => "rs",
            Language::Java => "java",
            Language::Go => "go",
            Language::C => "c",
        }
    }

    /// True when the code is compiled to a binary before it runs (and the binary can be cached).
    pub fn is_compiled(self) -> bool {
        matches!(self, Language::Rust | Language::C)
    }

    /// Looks a name up in the alias table: case-insensitive, surrounding spaces ignored.
    pub fn parse(name: &str) -> Result<Language, UnknownLanguage> {
        let wanted = name.trim().to_ascii_lowercase();
        Language::ALL
            .into_iter()
            .find(|lang| lang.aliases().contains(&wanted.as_str()))
            .ok_or_else(|| UnknownLanguage {
                name: name.to_string(),
            })
    }

    /// The canonical names, comma separated, for error messages.
    pub fn known_names() -> String {
        Language::ALL
            .iter()
            .map(|lang| lang.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Language {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl FromStr for Language {
    type Err = UnknownLanguage;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Language::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve_to_canonical_names() {
        let cases = [
            ("py", Language::Python),
            ("Python3", Language::Python),
            (" python ", Language::Python),
            ("shell", Language::Bash),
            ("sh", Language::Sh),
            ("js", Language::Javascript),
            ("node", Language::Javascript),
            ("rs", Language::Rust),
            ("golang", Language::Go),
            ("C", Language::C),
        ];
        for (name, want) in cases {
            assert_eq!(Language::parse(name), Ok(want), "alias {name}");
        }
    }

    #[test]
    fn canonical_name_round_trips() {
        for lang in Language::ALL {
            assert_eq!(Language::parse(lang.name()), Ok(lang));
            assert_eq!(lang.aliases()[0], lang.name());
        }
    }

    #[test]
    fn no_alias_belongs_to_two_languages() {
        let mut seen = std::collections::HashSet::new();
        for lang in Language::ALL {
            for alias in lang.aliases() {
                assert!(seen.insert(*alias), "alias {alias} listed twice");
            }
        }
    }

    #[test]
    fn unknown_language_error_lists_known_ones() {
        let err = Language::parse("cobol").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("'cobol'"), "{text}");
        assert!(text.contains("python, bash, sh, javascript"), "{text}");
    }
}
