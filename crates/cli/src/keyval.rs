//! QEMU's `key=value,key=value` option syntax ("keyval"/QemuOpts).
//!
//! Written here because no crate implements QEMU's rules: a leading element
//! without `=` is the value of an *implied* key (`-M microvm` is
//! `type=microvm`), `,,` inside a value is a literal comma, and a key that
//! appears twice keeps its last value (QemuOpts behaviour, which is what the
//! options we support use).

use crate::CliError;

/// An ordered list of `key=value` pairs parsed from one option argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVals {
    pairs: Vec<(String, String)>,
}

/// Split `s` into pairs. `implied` names the key of a leading bare value.
pub fn parse(option: &str, s: &str, implied: Option<&str>) -> Result<KeyVals, CliError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut elements = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                elements.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    elements.push(cur);
    for (i, el) in elements.into_iter().enumerate() {
        match el.split_once('=') {
            Some((k, v)) => {
                if k.is_empty() {
                    return Err(CliError::new(option, s, "empty key"));
                }
                pairs.push((k.to_string(), v.to_string()));
            }
            None if i == 0 && implied.is_some() => {
                if el.is_empty() {
                    return Err(CliError::new(option, s, "empty value"));
                }
                pairs.push((implied.unwrap_or_default().to_string(), el));
            }
            None if el.is_empty() && i > 0 => {
                // A trailing comma ("a=b,") is accepted by QEMU.
            }
            None => {
                return Err(CliError::new(
                    option,
                    s,
                    &format!("expected key=value, found '{el}'"),
                ));
            }
        }
    }
    KeyVals { pairs }.with_wellformed_id(option, s)
}

/// QEMU's rule for the ids of options (id_wellformed): letters, digits,
/// '-', '.', '_', starting with a letter. (moat builds device paths from
/// them: a '/' must not get in.)
pub fn check_id(option: &str, s: &str, id: &str) -> Result<(), CliError> {
    let mut b = id.bytes();
    let ok = b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'));
    match ok {
        true => Ok(()),
        false => Err(CliError::new(
            option,
            s,
            "Parameter 'id' expects an identifier\n\
             Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
        )),
    }
}

/// An option argument in QEMU's JSON form (`-netdev '{"type": "tap", ...}'`,
/// as libvirt writes it): nested objects become dotted keys, booleans
/// `on`/`off`, numbers their decimal text, so the same keyval parser reads
/// both forms.
pub fn parse_json(option: &str, s: &str) -> Result<KeyVals, CliError> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(s)
        .map_err(|e| CliError::new(option, s, &format!("invalid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(CliError::new(option, s, "expected a JSON object"));
    };
    fn flatten(
        prefix: &str,
        m: serde_json::Map<String, Value>,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), String> {
        for (k, v) in m {
            let key = if prefix.is_empty() {
                k
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Object(inner) => flatten(&key, inner, out)?,
                Value::String(s) => out.push((key, s)),
                Value::Bool(b) => out.push((key, if b { "on" } else { "off" }.into())),
                Value::Number(n) => out.push((key, n.to_string())),
                Value::Null | Value::Array(_) => {
                    return Err(format!("'{key}': unsupported JSON value"))
                }
            }
        }
        Ok(())
    }
    let mut pairs = Vec::new();
    flatten("", m, &mut pairs).map_err(|e| CliError::new(option, s, &e))?;
    KeyVals { pairs }.with_wellformed_id(option, s)
}

impl KeyVals {
    fn with_wellformed_id(self, option: &str, s: &str) -> Result<KeyVals, CliError> {
        for (_, id) in self.pairs.iter().filter(|(k, _)| k == "id") {
            check_id(option, s, id)?;
        }
        Ok(self)
    }

    /// Take the last value of `key`, removing every occurrence.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        self.pairs.retain(|(k, v)| {
            if k == key {
                found = Some(v.clone());
                false
            } else {
                true
            }
        });
        found
    }

    /// Add a pair at the end.
    pub fn push(&mut self, key: String, value: String) {
        self.pairs.push((key, value));
    }

    /// Remove and return the first remaining pair.
    pub fn pop(&mut self) -> Option<(String, String)> {
        if self.pairs.is_empty() {
            None
        } else {
            Some(self.pairs.remove(0))
        }
    }

    /// Take every `root` and `root.…` key, for each of `roots`, as one JSON
    /// tree of nested objects (QEMU's qdict_crumple): `backing.file.filename=F`
    /// becomes `{"backing": {"file": {"filename": "F"}}}`. A key that is both
    /// a value and has keys below it is an error naming it.
    pub fn take_tree(
        &mut self,
        roots: &[&str],
    ) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        use serde_json::{Map, Value};
        let mut tree = Map::new();
        let mut rest = Vec::new();
        for (k, v) in std::mem::take(&mut self.pairs) {
            let root = k.split('.').next().unwrap_or_default();
            if !roots.contains(&root) {
                rest.push((k, v));
                continue;
            }
            let parts: Vec<&str> = k.split('.').collect();
            let mut node = &mut tree;
            for (i, part) in parts.iter().enumerate() {
                if i + 1 == parts.len() {
                    if matches!(node.get(*part), Some(Value::Object(_))) {
                        return Err(format!("Invalid parameter '{k}'"));
                    }
                    node.insert(part.to_string(), Value::String(v.clone()));
                } else {
                    let next = node
                        .entry(part.to_string())
                        .or_insert_with(|| Value::Object(Map::new()));
                    let Value::Object(m) = next else {
                        return Err(format!("Invalid parameter '{k}'"));
                    };
                    node = m;
                }
            }
        }
        self.pairs = rest;
        Ok(tree)
    }

    /// Error naming the first key nobody took.
    pub fn finish(self, option: &str, arg: &str) -> Result<(), CliError> {
        match self.pairs.into_iter().next() {
            None => Ok(()),
            Some((k, _)) => Err(CliError::new(
                option,
                arg,
                &format!("Invalid parameter '{k}'"),
            )),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// QEMU's boolean spellings.
pub fn parse_bool(option: &str, key: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(CliError::new(
            option,
            v,
            &format!("Parameter '{key}' expects 'on' or 'off'"),
        )),
    }
}

/// QEMU's size syntax: a number (fraction allowed) and an optional suffix
/// B/K/M/G/T/P/E (either case); `default_unit` applies without suffix.
pub fn parse_size(option: &str, v: &str, default_unit: u64) -> Result<u64, CliError> {
    let bad = |why: &str| CliError::new(option, v, why);
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    if num.is_empty() {
        return Err(bad("invalid size"));
    }
    let unit: u64 = match suffix {
        "" => default_unit,
        "B" | "b" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        "P" | "p" => 1 << 50,
        "E" | "e" => 1 << 60,
        _ => return Err(bad("invalid size suffix")),
    };
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(bad("invalid size"));
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| bad("size too large"))?
    };
    let mut total = int.checked_mul(unit).ok_or_else(|| bad("size too large"))?;
    if !frac_part.is_empty() {
        if unit == 1 {
            return Err(bad("fractional bytes are not allowed"));
        }
        // Compute the fraction exactly with at most 18 digits.
        let digits: String = frac_part.chars().take(18).collect();
        let frac: u128 = digits.parse().map_err(|_| bad("invalid size"))?;
        let scale = 10u128.pow(u32::try_from(digits.len()).unwrap_or(18));
        let extra = frac * u128::from(unit) / scale;
        total = u64::try_from(u128::from(total) + extra).map_err(|_| bad("size too large"))?;
    }
    Ok(total)
}

/// A plain unsigned number (decimal, or 0x hex as QEMU's number parser allows).
pub fn parse_u64(option: &str, key: &str, v: &str) -> Result<u64, CliError> {
    let r = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        v.parse()
    };
    r.map_err(|_| CliError::new(option, v, &format!("Parameter '{key}' expects a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implied_and_escapes() {
        let mut kv = parse("-M", "microvm,acpi=off,x=a,,b", Some("type")).unwrap();
        assert_eq!(kv.take("type").as_deref(), Some("microvm"));
        assert_eq!(kv.take("acpi").as_deref(), Some("off"));
        assert_eq!(kv.take("x").as_deref(), Some("a,b"));
        assert!(kv.is_empty());
    }

    #[test]
    fn last_wins_and_unknown_is_named() {
        let mut kv = parse("-smp", "cpus=2,cpus=4,bogus=1", Some("cpus")).unwrap();
        assert_eq!(kv.take("cpus").as_deref(), Some("4"));
        let e = kv.finish("-smp", "x").unwrap_err();
        assert!(e.to_string().contains("'bogus'"), "{e}");
    }

    #[test]
    fn bare_value_without_implied_key_is_error() {
        assert!(parse("-x", "foo", None).is_err());
        assert!(parse("-x", "a=1,foo", Some("k")).is_err());
        assert!(parse("-x", "=1", Some("k")).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("-m", "512", 1 << 20).unwrap(), 512 << 20);
        assert_eq!(parse_size("-m", "1G", 1 << 20).unwrap(), 1 << 30);
        assert_eq!(parse_size("-m", "1.5g", 1 << 20).unwrap(), 3 << 29);
        assert_eq!(parse_size("-m", "4096k", 1 << 20).unwrap(), 4 << 20);
        assert_eq!(parse_size("-m", "100B", 1 << 20).unwrap(), 100);
        assert!(parse_size("-m", "12Q", 1 << 20).is_err());
        assert!(parse_size("-m", "", 1 << 20).is_err());
        assert!(parse_size("-m", "1.2.3", 1 << 20).is_err());
        assert!(parse_size("-m", "99999999999E", 1 << 20).is_err());
        assert!(parse_size("-m", "-1", 1 << 20).is_err());
    }
}
