//! Regexes of the mesh's config (a StringMatch's `regex`), which reach
//! proxies as Envoy's safe regex: RE2 syntax, matched against the whole
//! value. One compile for Galley, which refuses what would not compile,
//! and the proxy, which matches with it, so that no pattern Galley
//! accepts is refused by a proxy. RE2 has no `x` (verbose) flag, which
//! also comments out what follows `#`; a pattern using it would be refused
//! by Envoy, and cannot be anchored here, so it is refused.

use regex::Regex;
use regex_syntax::ast::{self, Ast, Flag, FlagsItemKind, GroupKind};

/// `pattern` compiled to match a whole value; the error says why not.
pub fn whole_value(pattern: &str) -> Result<Regex, String> {
    let parsed = ast::parse::Parser::new()
        .parse(pattern)
        .map_err(|e| e.kind().to_string())?;
    if verbose(&parsed) {
        return Err("the x flag is not RE2 syntax (Envoy refuses it)".into());
    }
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        let why = e.to_string();
        why.lines().last().unwrap_or(&why).trim().to_string()
    })
}

/// Whether the x flag is turned on anywhere in `ast`.
fn verbose(ast: &Ast) -> bool {
    let sets_x = |flags: &ast::Flags| {
        let mut negated = false;
        flags.items.iter().any(|item| match item.kind {
            FlagsItemKind::Negation => {
                negated = true;
                false
            }
            FlagsItemKind::Flag(Flag::IgnoreWhitespace) => !negated,
            FlagsItemKind::Flag(_) => false,
        })
    };
    match ast {
        Ast::Flags(set) => sets_x(&set.flags),
        Ast::Group(group) => {
            matches!(&group.kind, GroupKind::NonCapturing(flags) if sets_x(flags))
                || verbose(&group.ast)
        }
        Ast::Repetition(r) => verbose(&r.ast),
        Ast::Alternation(a) => a.asts.iter().any(verbose),
        Ast::Concat(c) => c.asts.iter().any(verbose),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_values() {
        let re = whole_value("a|ab").unwrap();
        assert!(re.is_match("ab"), "the alternative that spans the value");
        assert!(!re.is_match("abc"));
        assert!(
            whole_value("/api/v[0-9]+/.*")
                .unwrap()
                .is_match("/api/v2/x")
        );
    }

    #[test]
    fn the_verbose_flag_and_bad_syntax_are_refused_with_a_reason() {
        for pattern in ["(?x)a #c", "(?x) a b", "a(?ix:b)", "(?i)(?x)z"] {
            let why = whole_value(pattern).unwrap_err();
            assert!(why.contains("x flag"), "{pattern}: {why}");
        }
        // Turned off, or a literal `x`, is fine.
        for pattern in ["(?-x)a", "(?i-x)a", r"\(?x\)", "[(?x)]"] {
            assert!(whole_value(pattern).is_ok(), "{pattern}");
        }
        assert!(whole_value("a)").unwrap_err().contains("unopened group"));
        assert!(whole_value("(?=a)").is_err(), "no look-around in RE2");
    }
}
