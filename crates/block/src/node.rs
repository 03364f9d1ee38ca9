//! QEMU's block node options, the part moat supports: one parser of the
//! option tree for `-drive` (whose dotted keys the command line turns into
//! this tree, as QEMU's qdict_crumple does) and QMP `blockdev-add` alike.
//!
//! A format node is `{"driver": "raw"|"qcow2", "file": {"driver": "file",
//! "filename": F}}`, a qcow2 node may add `"backing": {...}|null` and
//! `"data-file": {"driver": "file", "filename": F}`; a protocol node alone
//! (`{"driver": "file", "filename": F}`) is a raw image. Errors are worded
//! as QEMU's (`Parameter 'backing.driver' is missing`) and name the dotted
//! key. moat never follows a node reference by name, never probes a format,
//! and opens at most [`MAX_BACKING_DEPTH`] layers.

use moat_config::{Backing, DriveFormat, ImageLayer, MAX_BACKING_DEPTH};
use serde_json::{Map, Value};

/// Keys a protocol node may have.
const FILE_KEYS: &[&str] = &["driver", "filename", "aio", "locking"];
/// Keys a backing layer may have.
const LAYER_KEYS: &[&str] = &["driver", "file", "backing", "data-file", "read-only"];

/// A nested node under `what`, with only the `allowed` keys.
fn nested<'a>(
    what: &str,
    v: &'a Value,
    allowed: &[&str],
) -> Result<&'a Map<String, Value>, String> {
    let m = match v {
        Value::Object(m) => m,
        Value::String(r) => {
            return Err(format!(
            "{what}: references to other nodes ('{r}') are not supported; give the options inline"
        ))
        }
        _ => {
            return Err(format!(
                "Invalid parameter type for '{what}', expected: object"
            ))
        }
    };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("Parameter '{what}.{k}' is unexpected"));
    }
    Ok(m)
}

/// The file a protocol node (`driver: file` or `host_device`) opens.
fn protocol_file(prefix: &str, m: &Map<String, Value>) -> Result<std::path::PathBuf, String> {
    match m.get("driver").and_then(Value::as_str) {
        Some("file" | "host_device") => {}
        Some(d) => {
            return Err(format!(
                "Parameter '{prefix}driver' does not accept value '{d}' (moat opens local files)"
            ))
        }
        None => return Err(format!("Parameter '{prefix}driver' is missing")),
    }
    match m.get("filename") {
        Some(Value::String(f)) if !f.is_empty() => Ok(f.into()),
        Some(Value::String(_)) => Err(format!("Parameter '{prefix}filename': empty file name")),
        Some(_) => Err(format!(
            "Invalid parameter type for '{prefix}filename', expected: string"
        )),
        None => Err(format!("Parameter '{prefix}filename' is missing")),
    }
}

/// One layer and the layers named below it; `prefix` is its dotted path
/// ("" for the top, "backing." below it), `depth` how many are above.
pub fn layer(prefix: &str, m: &Map<String, Value>, depth: usize) -> Result<ImageLayer, String> {
    if depth >= MAX_BACKING_DEPTH {
        return Err(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH} images"
        ));
    }
    let driver = m.get("driver").and_then(Value::as_str).unwrap_or_default();
    let format = match driver {
        "file" | "host_device" => {
            return Ok(ImageLayer {
                file: protocol_file(prefix, m)?,
                format: DriveFormat::Raw,
                backing: Backing::None,
                data_file: None,
            })
        }
        "raw" => DriveFormat::Raw,
        "qcow2" => DriveFormat::Qcow2,
        "" => {
            return Err(format!(
                "Parameter '{prefix}driver' is missing (moat never probes image formats)"
            ))
        }
        d => {
            return Err(format!(
                "Parameter '{prefix}driver' does not accept value '{d}' (moat reads raw and qcow2)"
            ))
        }
    };
    for k in ["filename", "aio", "locking"] {
        if m.contains_key(k) {
            return Err(format!("Parameter '{prefix}{k}' is unexpected"));
        }
    }
    let Some(file) = m.get("file") else {
        return Err(format!("Parameter '{prefix}file' is missing"));
    };
    let file = protocol_file(
        &format!("{prefix}file."),
        nested(&format!("{prefix}file"), file, FILE_KEYS)?,
    )?;
    if format == DriveFormat::Raw {
        for k in ["backing", "data-file"] {
            if m.contains_key(k) {
                return Err(format!(
                    "Parameter '{prefix}{k}' is unexpected (a raw image has no backing file or data file)"
                ));
            }
        }
    }
    let backing = match m.get("backing") {
        None => Backing::Unnamed,
        Some(Value::Null) => Backing::None,
        Some(v) => {
            let below = nested(&format!("{prefix}backing"), v, LAYER_KEYS)?;
            Backing::Layer(Box::new(layer(
                &format!("{prefix}backing."),
                below,
                depth + 1,
            )?))
        }
    };
    let data_file = match m.get("data-file") {
        None => None,
        Some(v) => Some(protocol_file(
            &format!("{prefix}data-file."),
            nested(&format!("{prefix}data-file"), v, FILE_KEYS)?,
        )?),
    };
    Ok(ImageLayer {
        file,
        format,
        backing,
        data_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ImageLayer, String> {
        layer("", v.as_object().unwrap(), 0)
    }

    #[test]
    fn a_chain_of_named_layers() {
        let l = parse(json!({
            "driver": "qcow2", "file": {"driver": "file", "filename": "top"},
            "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "mid"},
                        "backing": {"driver": "raw", "file": {"driver": "file", "filename": "base"}}},
            "data-file": {"driver": "file", "filename": "data"}
        }))
        .unwrap();
        let files: Vec<_> = l.layers().map(|l| l.file.display().to_string()).collect();
        assert_eq!(files, ["top", "mid", "base"]);
        assert_eq!(l.data_file, Some("data".into()));
        let none = parse(json!({"driver": "qcow2", "file": {"driver": "file", "filename": "t"}, "backing": null})).unwrap();
        assert_eq!(none.backing, Backing::None);
    }

    #[test]
    fn bad_trees_are_refused_naming_the_key() {
        let f = json!({"driver": "file", "filename": "f"});
        for (tree, want) in [
            (
                json!({"driver": "qcow2", "file": f, "backing": {"file": f}}),
                "Parameter 'backing.driver' is missing",
            ),
            (
                json!({"driver": "qcow2", "file": f, "backing": {"driver": "raw"}}),
                "Parameter 'backing.file' is missing",
            ),
            (
                json!({"driver": "vmdk", "file": f}),
                "'driver' does not accept value 'vmdk'",
            ),
            (
                json!({"driver": "raw", "file": {"driver": "nbd", "filename": "x"}}),
                "'file.driver' does not accept value 'nbd'",
            ),
            (
                json!({"driver": "raw", "file": f, "backing": null}),
                "'backing' is unexpected",
            ),
            (
                json!({"driver": "qcow2", "file": f, "backing": "node0"}),
                "references to other nodes",
            ),
            (
                json!({"driver": "qcow2", "file": f, "backing": {"driver": "raw", "file": f, "bogus": 1}}),
                "'backing.bogus' is unexpected",
            ),
        ] {
            let e = parse(tree.clone()).unwrap_err();
            assert!(e.contains(want), "{tree}: {e}");
        }
        let mut deep = json!({"driver": "raw", "file": f});
        for _ in 0..MAX_BACKING_DEPTH {
            deep = json!({"driver": "qcow2", "file": f, "backing": deep});
        }
        assert!(parse(deep).unwrap_err().contains("deeper than"));
    }
}
