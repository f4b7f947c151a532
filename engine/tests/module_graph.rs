//! The workspace's module graph, read from the sources (outside comments and
//! test modules), as docs/architecture.md draws it:
//!
//! - in each crate (the engine, the NBD frontend, the binary) no two modules
//!   import each other, directly or around a loop: a module that needs to call
//!   back into its owner gets a narrow trait instead of an import. A module's
//!   use of its ancestors (the type whose methods it adds, the items its parent
//!   shares with its children) is how Rust splits a module into files, not an
//!   import between concepts, and is not counted;
//! - the engine's top-level seams hold (the copier, the journal and the
//!   backends do not reach back into the mirror);
//! - the NBD frontend uses only the engine surface that docs/architecture.md
//!   names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the engine sits in the workspace").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a source file holds, as a path from the crate root (`""` for
/// `lib.rs` or `main.rs`, `a::b` for `a/b.rs` or `a/b/mod.rs`); `None` for a
/// file of test modules.
fn module_path(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel.components().filter_map(|c| c.as_os_str().to_str().map(String::from)).collect();
    let stem = parts.pop()?.strip_suffix(".rs")?.to_string();
    let at_root = parts.is_empty() && (stem == "lib" || stem == "main");
    if stem == "tests" || parts.iter().any(|p| p == "tests") {
        return None;
    }
    if stem != "mod" && !at_root {
        parts.push(stem);
    }
    Some(parts.join("::"))
}

/// A file's code: cut at its test module (tests may reach anywhere), line
/// comments and doc comments dropped.
fn code_of(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    code.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The leaf paths of one `use` tree (`a::{b, c::{d, e as f}}` → `a::b`,
/// `a::c::d`, `a::c::e`).
fn expand_use(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or("").trim();
        return if path.is_empty() { Vec::new() } else { vec![path.to_string()] };
    };
    let prefix = tree[..open].trim().trim_end_matches("::");
    let Some(close) = tree.rfind('}').filter(|c| *c > open) else { return Vec::new() };
    let inner = &tree[open + 1..close];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    let mut out = Vec::new();
    for part in parts {
        for leaf in expand_use(part) {
            out.push(match leaf.as_str() {
                "self" => prefix.to_string(),
                _ if prefix.is_empty() => leaf,
                _ => format!("{prefix}::{leaf}"),
            });
        }
    }
    out
}

/// Every path a file's code names: the leaves of its `use` trees, and inline
/// paths that start with `crate::`, `super::`, `self::` or `engine::`.
fn paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    // A `use` item starts a line (after its visibility) and ends at `;`.
    let lines: Vec<&str> = code.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = match t.strip_prefix("pub") {
            Some(r) if r.starts_with('(') => r.split_once(')').map_or("", |(_, r)| r.trim_start()),
            Some(r) => r.trim_start(),
            None => t,
        };
        let Some(tree) = t.strip_prefix("use ") else { continue };
        let mut item = tree.to_string();
        let mut more = lines[n + 1..].iter();
        while !item.contains(';') {
            let Some(next) = more.next() else { break };
            item.push(' ');
            item.push_str(next);
        }
        out.extend(expand_use(item.split(';').next().unwrap_or("")));
    }
    for root in ["crate::", "super::", "self::", "engine::"] {
        let mut rest = code;
        while let Some(i) = rest.find(root) {
            let before_ok = rest[..i].chars().next_back().is_none_or(|c| !ident(c) && c != ':');
            let path: String = rest[i..].chars().take_while(|c| ident(*c) || *c == ':').collect();
            rest = &rest[i + root.len()..];
            let path = path.trim_end_matches(':');
            // `crate::{` is a use tree, read above.
            if before_ok && path.len() > root.len() - 2 {
                out.insert(path.to_string());
            }
        }
    }
    out
}

fn parent(m: &str) -> &str {
    m.rsplit_once("::").map_or("", |(p, _)| p)
}

fn join(base: &str, seg: &str) -> String {
    if base.is_empty() {
        seg.to_string()
    } else {
        format!("{base}::{seg}")
    }
}

/// The module of this crate that `path`, named in module `m`, reaches into;
/// `None` for another crate or the standard library.
fn resolve(path: &str, m: &str, modules: &BTreeSet<String>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let (mut base, mut i) = match segs.first() {
        Some(&"crate") => (String::new(), 1),
        Some(&"self") => (m.to_string(), 1),
        Some(&"super") => {
            let mut b = m.to_string();
            let mut i = 0;
            while segs.get(i) == Some(&"super") {
                b = parent(&b).to_string();
                i += 1;
            }
            (b, i)
        }
        // A bare path starts at a child module (2018 paths).
        Some(first) if modules.contains(&join(m, first)) => (m.to_string(), 0),
        _ => return None,
    };
    while let Some(seg) = segs.get(i) {
        let next = join(&base, seg);
        if !modules.contains(&next) {
            break;
        }
        base = next;
        i += 1;
    }
    Some(base)
}

fn is_ancestor(a: &str, m: &str) -> bool {
    a.is_empty() || m.starts_with(&format!("{a}::"))
}

/// A crate's module graph: for each module, the modules it imports
/// (ancestors left out) and the paths its code names.
struct Graph {
    modules: BTreeSet<String>,
    edges: BTreeMap<String, BTreeSet<String>>,
    paths: BTreeMap<String, BTreeSet<String>>,
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let files: Vec<(String, PathBuf)> = files.into_iter().filter_map(|f| Some((module_path(src, &f)?, f))).collect();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut named: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, f) in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        let ps = paths(&code_of(&text));
        for p in &ps {
            if let Some(t) = resolve(p, m, &modules) {
                if t != *m && !is_ancestor(&t, m) {
                    edges.entry(m.clone()).or_default().insert(t);
                }
            }
        }
        named.entry(m.clone()).or_default().extend(ps);
    }
    Graph { modules, edges, paths: named }
}

/// The first import loop found, as the modules around it.
fn find_loop(g: &Graph) -> Option<Vec<String>> {
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
    g.modules.iter().find_map(|m| visit(m, &g.edges, &mut Vec::new(), &mut done))
}

fn assert_no_loop(krate: &str, g: &Graph) {
    assert!(g.modules.len() > 8, "{krate}: found only {:?}", g.modules);
    if let Some(cycle) = find_loop(g) {
        panic!("{krate}: modules import each other in a loop: {}\nall imports: {:#?}", cycle.join(" -> "), g.edges);
    }
}

#[test]
fn no_crate_has_an_import_loop() {
    let ws = workspace();
    for (krate, src) in [("engine", "engine/src"), ("nbd-frontend", "nbd-frontend/src"), ("livemirror", "src")] {
        assert_no_loop(krate, &graph(&ws.join(src)));
    }
}

#[test]
fn the_engine_seams_hold() {
    let g = graph(&workspace().join("engine/src"));
    // At the top level: `mirror/write.rs` counts as `mirror`.
    let top = |m: &str| m.split("::").next().unwrap_or("").to_string();
    let uses = |a: &str, b: &str| g.edges.iter().any(|(m, ts)| top(m) == a && ts.iter().any(|t| top(t) == b));
    assert!(
        uses("mirror", "copier") && !uses("copier", "mirror"),
        "the copier works through a job handle: {:#?}",
        g.edges
    );
    assert!(uses("mirror", "journal") && !uses("journal", "mirror"), "the journal reaches its host through a trait");
    assert!(!uses("backend", "mirror") && !uses("backend", "route"), "backends know nothing of routing");
}

/// The engine items docs/architecture.md lists as what the frontend uses: the
/// backticked names in the last column of the table in its section "The
/// engine surface the frontend uses".
fn documented_surface() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(workspace().join("docs/architecture.md")).expect("read docs/architecture.md");
    let Some((_, section)) = doc.split_once("## The engine surface the frontend uses") else {
        panic!("docs/architecture.md has no section \"The engine surface the frontend uses\"");
    };
    let section = section.split("\n## ").next().unwrap_or("");
    let items =
        section.lines().filter(|l| l.starts_with('|')).filter_map(|l| l.trim_end_matches('|').rsplit('|').next());
    items.flat_map(|cell| cell.split('`').skip(1).step_by(2).map(String::from).collect::<Vec<_>>()).collect()
}

#[test]
fn the_frontend_uses_only_the_engine_surface_the_architecture_names() {
    let surface = documented_surface();
    assert!(surface.contains("BlockDevice"), "the surface read from the doc: {surface:?}");
    let g = graph(&workspace().join("nbd-frontend/src"));
    let mut outside = BTreeSet::new();
    let mut used = BTreeSet::new();
    for (m, ps) in &g.paths {
        for p in ps.iter().filter_map(|p| p.strip_prefix("engine::")) {
            match surface.iter().find(|item| p == item.as_str() || p.starts_with(&format!("{item}::"))) {
                Some(item) => {
                    used.insert(item.clone());
                }
                None => {
                    outside.insert(format!("engine::{p} (in {m})"));
                }
            }
        }
    }
    assert!(outside.is_empty(), "the frontend uses engine items docs/architecture.md does not name: {outside:#?}");
    let unused: Vec<&String> = surface.difference(&used).collect();
    assert!(unused.is_empty(), "docs/architecture.md names engine items the frontend does not use: {unused:?}");
}

#[test]
fn the_path_scanner_sees_imports_and_ignores_comments_and_tests() {
    let text =
        "use crate::{a, b::{C, d as e}};\nuse super::f;\n// crate::g\nfn h() { crate::i::j(); engine::K::new(); \
                xself::no(); }\n#[cfg(test)]\nuse crate::z;";
    let got: Vec<String> = paths(&code_of(text)).into_iter().collect();
    assert_eq!(got, ["crate::a", "crate::b::C", "crate::b::d", "crate::i::j", "engine::K::new", "super::f"]);
    let modules: BTreeSet<String> = ["a", "a::b", "a::c", "d"].into_iter().map(String::from).collect();
    assert_eq!(resolve("super::c::X", "a::b", &modules).as_deref(), Some("a::c"));
    assert_eq!(resolve("crate::d::Y", "a::b", &modules).as_deref(), Some("d"));
    assert_eq!(resolve("b::Z", "a", &modules).as_deref(), Some("a::b"), "a bare path into a child module");
    assert_eq!(resolve("std::io", "a", &modules), None);
    assert!(is_ancestor("a", "a::b") && is_ancestor("", "a") && !is_ancestor("a::b", "a::c"));
}
