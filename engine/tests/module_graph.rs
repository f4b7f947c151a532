//! The engine's top-level modules import each other without a loop (the
//! architecture docs/architecture.md draws): a module that needs to call back
//! into its owner gets a narrow trait instead of an import. Read from the
//! sources, outside comments and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level module a source file belongs to (`mirror/write.rs` → `mirror`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read engine/src").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::NAME` references in code: comments dropped, and the file cut at its
/// test module (tests may reach anywhere).
fn references(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        if let Some(i) = line.find("crate::{") {
            for part in line[i + "crate::{".len()..].split([',', '}']) {
                let name: String = part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn engine_modules_import_each_other_without_a_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    assert!(modules.len() > 10, "found only {modules:?}");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else { continue };
        let text = std::fs::read_to_string(f).expect("read a source file");
        for r in references(&text) {
            if r != m && modules.contains(&r) {
                edges.entry(m.clone()).or_default().insert(r);
            }
        }
    }
    // Depth-first search for a back edge; report the loop it closes.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in &modules {
        if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("engine modules import each other in a loop: {}\nall imports: {edges:#?}", cycle.join(" -> "));
        }
    }
    // The seams the architecture relies on, so a refactor that drops them is seen.
    let uses = |a: &str, b: &str| edges.get(a).is_some_and(|s| s.contains(b));
    assert!(uses("mirror", "copier") && !uses("copier", "mirror"), "the copier works through a job handle: {edges:#?}");
    assert!(uses("mirror", "journal") && !uses("journal", "mirror"), "the journal reaches its host through a trait");
    assert!(!uses("backend", "mirror") && !uses("backend", "route"), "backends know nothing of routing");
}

#[test]
fn the_reference_scanner_sees_imports_and_ignores_comments_and_tests() {
    let text =
        "use crate::{a, b::C};\nuse crate::d;\n// crate::e\nfn f() { crate::g::h(); }\n#[cfg(test)]\nuse crate::z;";
    let got: Vec<String> = references(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "d", "g"]);
}
