//! `livemirror generate json KEY=TEXT KEY:=JSON ...`: one JSON object on one line, built from
//! arguments, for shell scripts that speak JSON (livemirror-install --json) and must never
//! escape text themselves: a reason or a device name can hold quotes, backslashes, newlines.
//! `KEY=TEXT` makes a string; `KEY:=JSON` inserts a JSON value (a number from `status --get`,
//! `null`, `true`), which must parse. The keys come out in the order given.

use anyhow::{bail, Context};

/// The object the arguments describe, as one line of compact JSON (no newline).
pub(crate) fn object<S: AsRef<str>>(pairs: &[S]) -> anyhow::Result<String> {
    let mut out = String::from("{");
    let mut keys: Vec<&str> = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.iter().enumerate() {
        let pair = pair.as_ref();
        let Some(eq) = pair.find('=') else {
            bail!("{pair:?} is not KEY=TEXT or KEY:=JSON");
        };
        let (key, raw) = match pair[..eq].strip_suffix(':') {
            Some(k) => (k, true),
            None => (&pair[..eq], false),
        };
        if key.is_empty() {
            bail!("{pair:?} has no key");
        }
        if keys.contains(&key) {
            bail!("the key {key:?} is given twice");
        }
        keys.push(key);
        let value = &pair[eq + 1..];
        let value = if raw {
            let v: serde_json::Value =
                serde_json::from_str(value).with_context(|| format!("{key}:= takes a JSON value, not {value:?}"))?;
            v.to_string()
        } else {
            serde_json::Value::from(value).to_string()
        };
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::from(key).to_string());
        out.push(':');
        out.push_str(&value);
    }
    out.push('}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::object;

    #[test]
    fn text_is_escaped_and_json_is_inserted_in_order() {
        let line = object(&[
            "event=step",
            "step:=11",
            "reason=a \"quoted\" C:\\path\nsecond line\ttab \u{1} é",
            "eta:=null",
            "ok:=true",
            "rate:= 1.5e3 ",
            "list:=[1, {\"a\": \"b\"}]",
            "eq=a=b:=c",
            "empty=",
        ])
        .unwrap();
        assert!(!line.contains('\n'), "one line: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "step");
        assert_eq!(v["step"], 11);
        assert_eq!(v["reason"], "a \"quoted\" C:\\path\nsecond line\ttab \u{1} é");
        assert!(v["eta"].is_null());
        assert_eq!(v["ok"], true);
        assert_eq!(v["rate"], 1500.0);
        assert_eq!(v["list"][1]["a"], "b");
        assert_eq!(v["eq"], "a=b:=c");
        assert_eq!(v["empty"], "");
        assert!(line.starts_with(r#"{"event":"step","step":11,"reason":"a \"quoted\" C:\\path\nsecond"#), "{line}");
        assert_eq!(object::<&str>(&[]).unwrap(), "{}");
    }

    #[test]
    fn malformed_pairs_are_refused_with_the_reason() {
        for (args, want) in [
            (vec!["novalue"], "is not KEY=TEXT"),
            (vec!["=x"], "has no key"),
            (vec![":=1"], "has no key"),
            (vec!["n:=12abc"], "takes a JSON value"),
            (vec!["n:="], "takes a JSON value"),
            (vec!["s:=unquoted"], "takes a JSON value"),
            (vec!["a=1", "a:=2"], "given twice"),
        ] {
            let e = object(&args).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{args:?}: {e:#}");
        }
    }
}
