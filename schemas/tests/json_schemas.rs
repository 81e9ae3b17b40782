//! The checked-in JSON Schemas in `schemas/json/` must match the types.
//! Regenerate with `VMLOT_BLESS=1 cargo test -p vmlot-schemas --test json_schemas`.

use std::path::PathBuf;

#[test]
fn checked_in_schemas_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    let bless = std::env::var_os("VMLOT_BLESS").is_some();
    let mut stale = Vec::new();
    let mut expected_files = Vec::new();
    for (name, schema) in vmlot_schemas::json_schemas() {
        let path = dir.join(format!("{name}.schema.json"));
        expected_files.push(path.clone());
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if bless {
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") && !expected_files.contains(&path) {
            stale.push(format!("{} (no type generates it)", path.display()));
        }
    }
    assert!(
        stale.is_empty(),
        "stale JSON Schemas, regenerate with VMLOT_BLESS=1: {stale:?}"
    );
}
