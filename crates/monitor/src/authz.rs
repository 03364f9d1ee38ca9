//! Authorization of TLS monitor clients by their certificate's
//! distinguished name, as QEMU's `authz-simple` and `authz-list` objects do.

pub use moat_config::{AuthzRule as Rule, MatchFormat as Format};

/// An authorization policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// Exactly this identity is allowed.
    Simple(String),
    /// The first matching rule decides; else the default.
    List {
        default_allow: bool,
        rules: Vec<Rule>,
    },
}

impl Authz {
    pub fn allows(&self, identity: &str) -> bool {
        match self {
            Authz::Simple(id) => id == identity,
            Authz::List {
                default_allow,
                rules,
            } => rules
                .iter()
                .find(|r| match r.format {
                    Format::Exact => r.pattern == identity,
                    Format::Glob => glob(r.pattern.as_bytes(), identity.as_bytes()),
                })
                .map_or(*default_allow, |r| r.allow),
        }
    }
}

/// fnmatch(3) without flags: `*`, `?`, `[...]` (with `!`/`^` and ranges), `\\` escapes.
/// Iterative with backtracking to the last `*`: linear memory, no recursion.
pub fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let step = match p.get(pi) {
            Some(b'*') => {
                star = Some((pi + 1, si));
                pi += 1;
                continue;
            }
            Some(b'?') => Some(pi + 1),
            Some(b'[') => class(p, pi, s[si]),
            Some(b'\\') if pi + 1 < p.len() => (p[pi + 1] == s[si]).then_some(pi + 2),
            Some(&c) => (c == s[si]).then_some(pi + 1),
            None => None,
        };
        match step {
            Some(next) => {
                pi = next;
                si += 1;
            }
            None => match star {
                Some((sp, ss)) => {
                    pi = sp;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Match `c` against the bracket expression at `p[start]`; the index after it.
fn class(p: &[u8], start: usize, c: u8) -> Option<usize> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *p.get(i)?;
        if lo == b']' && !first {
            break;
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = p[i + 2];
            matched |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
    (matched != negate).then_some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"CN=*,O=Example", b"CN=alice,O=Example"));
        assert!(!glob(b"CN=*,O=Example", b"CN=alice,O=Evil"));
        assert!(glob(b"CN=b?b", b"CN=bob"));
        assert!(glob(b"CN=[a-c]*", b"CN=bob"));
        assert!(!glob(b"CN=[!a-c]*", b"CN=bob"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a\\*", b"a*"));
        assert!(!glob(b"a\\*", b"ab"));
        assert!(!glob(b"[", b"["));
        let long = vec![b'a'; 10_000];
        assert!(!glob(b"*a*a*a*a*a*b", &long));
    }

    #[test]
    fn policies() {
        let s = Authz::Simple("CN=alice".into());
        assert!(s.allows("CN=alice") && !s.allows("CN=alice2"));
        let l = Authz::List {
            default_allow: false,
            rules: vec![
                Rule {
                    pattern: "CN=mallory*".into(),
                    allow: false,
                    format: Format::Glob,
                },
                Rule {
                    pattern: "CN=*".into(),
                    allow: true,
                    format: Format::Glob,
                },
            ],
        };
        assert!(l.allows("CN=alice"));
        assert!(!l.allows("CN=mallory,O=x"));
        assert!(!l.allows("O=no-cn"));
    }
}
