//! Server-side filtering of lists (`?filter=`, the `api_filtering` API
//! extension), in Incus's syntax: clauses `FIELD eq|ne VALUE`, optionally
//! preceded by `not`, joined by `and` / `or` and evaluated left to right.
//! FIELD is a dotted path into the listed object (`name`, `status`,
//! `location`, `type`, `state.pid`); under `config.` / `expanded_config.` /
//! `devices.` the rest is the key itself (`config.limits.memory`). VALUE may
//! be double-quoted; it is compared with the field's text, ignoring ASCII
//! case (numbers and booleans as JSON writes them).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
struct Clause {
    not: bool,
    field: String,
    eq: bool,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Join {
    And,
    Or,
}

/// A parsed filter; an empty one matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    first: Option<Clause>,
    rest: Vec<(Join, Clause)>,
}

fn tokens(s: &str) -> Result<Vec<String>, String> {
    let mut out = vec![];
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut t = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => t.extend(chars.next()),
                    Some(c) => t.push(c),
                    None => return Err("unterminated quoted value".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                t.push(c);
                chars.next();
            }
        }
        out.push(t);
    }
    Ok(out)
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, String> {
        let bad = |why: &str| {
            format!(
                "invalid filter {s:?}: {why}; expected `FIELD eq|ne VALUE`, clauses joined by \
                 `and`/`or`, e.g. `status eq Running and location eq member1`"
            )
        };
        let toks = tokens(s).map_err(|e| bad(&e))?;
        let mut f = Filter::default();
        let mut it = toks.into_iter().peekable();
        let mut join = None;
        while it.peek().is_some() {
            let mut not = false;
            if it.peek().map(String::as_str) == Some("not") {
                not = true;
                it.next();
            }
            let field = it.next().ok_or_else(|| bad("a clause has no field"))?;
            let eq = match it.next().as_deref() {
                Some("eq") => true,
                Some("ne") => false,
                Some(op) => return Err(bad(&format!("unknown operator {op:?}"))),
                None => return Err(bad(&format!("{field:?} has no operator"))),
            };
            let value = it
                .next()
                .ok_or_else(|| bad(&format!("{field:?} has no value")))?;
            let clause = Clause {
                not,
                field,
                eq,
                value,
            };
            match join.take() {
                None if f.first.is_none() => f.first = Some(clause),
                Some(j) => f.rest.push((j, clause)),
                None => return Err(bad("two clauses without `and`/`or` between them")),
            }
            match it.next().as_deref() {
                None => break,
                Some("and") => join = Some(Join::And),
                Some("or") => join = Some(Join::Or),
                Some(t) => return Err(bad(&format!("expected `and` or `or`, got {t:?}"))),
            }
        }
        if join.is_some() {
            return Err(bad("it ends with `and`/`or`"));
        }
        Ok(f)
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let Some(first) = &self.first else {
            return true;
        };
        let mut acc = first.test(obj);
        for (join, c) in &self.rest {
            acc = match join {
                Join::And => acc && c.test(obj),
                Join::Or => acc || c.test(obj),
            };
        }
        acc
    }
}

impl Clause {
    fn test(&self, obj: &Value) -> bool {
        let text = lookup(obj, &self.field).map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            v => v.to_string(),
        });
        // Case-insensitive, as Incus compares (`incus list status=running`).
        let equal = text.is_some_and(|t| t.eq_ignore_ascii_case(&self.value));
        (equal == self.eq) != self.not
    }
}

fn lookup<'a>(obj: &'a Value, field: &str) -> Option<&'a Value> {
    for map in ["config", "expanded_config", "devices", "expanded_devices"] {
        if let Some(key) = field.strip_prefix(map).and_then(|k| k.strip_prefix('.')) {
            return obj.get(map)?.get(key);
        }
    }
    field.split('.').try_fold(obj, |v, k| v.get(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c1() -> Value {
        json!({"name": "c1", "status": "Running", "location": "member1", "type": "container",
               "config": {"limits.memory": "64MiB"}, "state": {"pid": 42}})
    }

    #[test]
    fn clauses_match_fields_config_keys_and_nested_values() {
        let m = |f: &str| Filter::parse(f).unwrap().matches(&c1());
        assert!(m(""));
        assert!(m("name eq c1"));
        assert!(m("status eq running"));
        assert!(!m("name eq c2"));
        assert!(m("name ne c2"));
        assert!(m("config.limits.memory eq 64MiB"));
        assert!(m("state.pid eq 42"));
        assert!(m("status eq Running and location eq member1"));
        assert!(!m("status eq Running and location eq member2"));
        assert!(m("name eq nope or type eq container"));
        assert!(m("not name eq c2"));
        assert!(m(r#"location eq "member1""#));
        assert!(!m("nosuch eq x"));
        assert!(m("nosuch ne x"));
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        for (f, why) in [
            ("name", "no operator"),
            ("name eq", "no value"),
            ("name like c1", "unknown operator"),
            ("name eq c1 location eq m1", "expected `and` or `or`"),
            ("name eq c1 and", "ends with"),
            (r#"name eq "c1"#, "unterminated"),
        ] {
            let e = Filter::parse(f).unwrap_err();
            assert!(
                e.contains(why) && e.contains("FIELD eq|ne VALUE"),
                "{f}: {e}"
            );
        }
    }
}
