//! No cycles between the top-level modules of any crate in the repository: a helper that two
//! modules need goes down into a leaf module that both use.
//!
//! Every `Cargo.toml` under the repository is read, the separate BPF workspace in
//! `ebpf/programs` included; each library and binary target is one crate. Its module graph comes
//! from `tally_tests::module_graph`. On success the whole edge list is printed (`--nocapture`
//! shows it); on failure each cycle is listed with the place of one reference per edge.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a repository it cannot read is a failed test"
)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use tally_tests::module_graph::{
    declared_modules, edges, knots, module_of, Edges, SourceFile, ROOT,
};

/// One library or binary target.
#[derive(Debug)]
struct Crate {
    /// The package name, with ` bin NAME` for a binary.
    name: String,
    root: PathBuf,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Every file named `name` under `dir`, build output and hidden folders left out.
fn find(dir: &Path, name: &dyn Fn(&str) -> bool, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if file != "target" && !file.starts_with('.') {
                find(&path, name, out);
            }
        } else if name(&file) {
            out.push(path);
        }
    }
}

/// The library and binary targets of every package, one per root file (two packages build
/// `tests/fake-nvml/src/lib.rs`; the first one found names it).
fn crates() -> Vec<Crate> {
    let mut manifests = Vec::new();
    find(&repo(), &|f| f == "Cargo.toml", &mut manifests);
    let mut out: Vec<Crate> = Vec::new();
    for manifest in manifests {
        let toml: toml::Table = fs::read_to_string(&manifest).unwrap().parse().unwrap();
        let Some(package) = toml.get("package").and_then(|p| p.get("name")) else {
            continue;
        };
        let package = package.as_str().unwrap();
        let dir = manifest.parent().unwrap();
        let path_of = |t: &toml::Value| t.get("path").and_then(|p| p.as_str()).map(PathBuf::from);
        let mut targets = Vec::new();
        let lib = toml.get("lib").and_then(path_of);
        targets.push((package.to_owned(), lib.unwrap_or("src/lib.rs".into())));
        for bin in toml
            .get("bin")
            .and_then(|b| b.as_array())
            .into_iter()
            .flatten()
        {
            let name = bin.get("name").and_then(|n| n.as_str()).unwrap_or(package);
            let path = path_of(bin).unwrap_or_else(|| format!("src/bin/{name}.rs").into());
            targets.push((format!("{package} bin {name}"), path));
        }
        if !targets.iter().any(|(_, p)| p == Path::new("src/main.rs")) {
            targets.push((format!("{package} bin {package}"), "src/main.rs".into()));
        }
        // Binaries cargo finds by themselves: src/bin/<name>.rs.
        if let Ok(entries) = fs::read_dir(dir.join("src/bin")) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .collect();
            found.sort();
            for path in found {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                targets.push((format!("{package} bin {name}"), path));
            }
        }
        for (name, path) in targets {
            let Ok(root) = dir.join(path).canonicalize() else {
                continue;
            };
            if !out.iter().any(|c| c.root == root) {
                out.push(Crate { name, root });
            }
        }
    }
    out
}

/// The root and the files of the top-level modules it declares.
fn sources(krate: &Crate) -> Vec<SourceFile> {
    let dir = krate.root.parent().unwrap();
    let read = |path: &Path, module: Vec<String>| SourceFile {
        module,
        label: relative(path),
        text: fs::read_to_string(path).unwrap(),
    };
    let root = read(&krate.root, Vec::new());
    let mut files = Vec::new();
    for module in declared_modules(&root.text) {
        let mut paths = Vec::new();
        let file = dir.join(format!("{module}.rs"));
        if file.is_file() {
            paths.push(file);
        }
        if dir.join(&module).is_dir() {
            find(&dir.join(&module), &|f| f.ends_with(".rs"), &mut paths);
        }
        for path in paths {
            let within = path.strip_prefix(dir).unwrap().to_string_lossy();
            let module = module_of(&within);
            files.push(read(&path, module));
        }
    }
    files.insert(0, root);
    files
}

fn site_list(edges: &Edges, from: &str, to: &str) -> String {
    let sites = &edges[&(from.to_owned(), to.to_owned())];
    let more = match sites.len() {
        1 => String::new(),
        n => format!(" (+{} more)", n - 1),
    };
    format!("{}:{}{more}", sites[0].file, sites[0].line)
}

#[test]
fn no_module_cycles_in_any_crate() {
    let crates = crates();
    let mut listing = String::new();
    let mut failures = String::new();
    let mut checked = BTreeSet::new();
    for krate in &crates {
        let files = sources(krate);
        checked.extend(files.iter().map(|f| repo().join(&f.label)));
        let modules = declared_modules(&files[0].text);
        let edges = edges(&files);
        let root = relative(&krate.root);
        writeln!(listing, "{} ({root}): {}", krate.name, modules.join(", ")).unwrap();
        for (from, to) in edges.keys() {
            let sites = site_list(&edges, from, to);
            writeln!(listing, "    {from} -> {to}    {sites}").unwrap();
        }
        for knot in knots(&edges) {
            let members: Vec<_> = knot.members.into_iter().collect();
            let members = members.join(", ");
            writeln!(failures, "{}: {members} depend on one another", krate.name).unwrap();
            for cycle in knot.cycles {
                writeln!(failures, "{}: {}", krate.name, cycle.join(" -> ")).unwrap();
                for pair in cycle.windows(2) {
                    let sites = site_list(&edges, &pair[0], &pair[1]);
                    writeln!(failures, "    {} -> {}    {sites}", pair[0], pair[1]).unwrap();
                }
            }
        }
    }
    println!("the dependency listing (module -> module, first reference):\n{listing}");

    // A file that no crate root reaches would escape the check: a crate the search missed, or a
    // module file nobody declares.
    let mut all = Vec::new();
    for krate in &crates {
        find(
            krate.root.parent().unwrap(),
            &|f| f.ends_with(".rs"),
            &mut all,
        );
    }
    let roots: BTreeSet<_> = crates.iter().map(|c| c.root.clone()).collect();
    let unchecked: Vec<String> = all
        .iter()
        .filter(|p| !checked.contains(*p) && !roots.contains(*p))
        .map(|p| relative(p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        unchecked.is_empty(),
        "source files outside every crate's module tree: {unchecked:?}"
    );
    assert!(
        failures.is_empty(),
        "module cycles, with one reference per edge (cutting them can leave a longer cycle, which \
         the next run lists):\n{failures}"
    );
}

/// The agent's layers as `ARCHITECTURE.md`'s table lists them, lowest first: each row's modules
/// in backticks (`main.rs` stands for the crate root).
fn layers(doc: &str) -> Vec<Vec<String>> {
    let table = doc
        .split("| layer | modules | may use |")
        .nth(1)
        .unwrap_or_default();
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cell = row.split('|').nth(2).unwrap_or("");
            let names = cell.split('`').skip(1).step_by(2);
            names
                .map(|n| if n == "main.rs" { ROOT } else { n }.to_owned())
                .collect()
        })
        .collect()
}

/// The agent's modules use only their own layer and the layers below it, as `ARCHITECTURE.md`
/// says, and every module has a layer.
#[test]
fn agent_modules_use_only_lower_layers() {
    let doc = fs::read_to_string(repo().join("ARCHITECTURE.md")).unwrap();
    let layers = layers(&doc);
    assert!(
        layers.len() >= 5,
        "ARCHITECTURE.md's layer table: {layers:?}"
    );
    let layer_of = |m: &str| layers.iter().position(|l| l.iter().any(|n| n == m));
    let agent = crates()
        .into_iter()
        .find(|c| c.name == "tally-agent")
        .unwrap();
    let files = sources(&agent);
    let unplaced: Vec<String> = declared_modules(&files[0].text)
        .into_iter()
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules without a layer in ARCHITECTURE.md: {unplaced:?}"
    );
    let edges = edges(&files);
    let upward: Vec<String> = edges
        .keys()
        .filter(|(from, to)| layer_of(to) > layer_of(from))
        .map(|(from, to)| format!("{from} -> {to}    {}", site_list(&edges, from, to)))
        .collect();
    assert!(
        upward.is_empty(),
        "agent modules using a higher layer (ARCHITECTURE.md):\n{}",
        upward.join("\n")
    );
}

#[test]
fn layers_are_read_from_the_table() {
    let doc = "text\n| layer | modules | may use |\n|---|---|---|\n| leaves | `a`, `b` (x) | nothing |\n| top | `main.rs`, `c` | `a` |\n\nafter\n";
    assert_eq!(layers(doc), [vec!["a", "b"], vec![ROOT, "c"]]);
}

/// A crate given as `(path under src, text)`; `lib.rs` is the root.
fn in_memory(files: &[(&str, &str)]) -> Vec<SourceFile> {
    files
        .iter()
        .map(|(path, text)| SourceFile {
            module: if *path == "lib.rs" {
                Vec::new()
            } else {
                module_of(path)
            },
            label: (*path).to_owned(),
            text: (*text).to_owned(),
        })
        .collect()
}

fn edge_set(files: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    edges(&in_memory(files)).into_keys().collect()
}

fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

const FOUR: &str = "mod a;\nmod b;\nmod c;\nmod d;\n";

#[test]
fn grouped_use_with_nested_braces_over_lines() {
    let a =
        "use crate::{\n    b::{self, X},\n    c::{inner::{Y, Z as W}},\n};\nuse std::{fmt, io};\n";
    let files = [("lib.rs", FOUR), ("a.rs", a)];
    assert_eq!(edge_set(&files), set(&[("a", "b"), ("a", "c")]));
    let listed = edges(&in_memory(&files));
    let line_of_c = listed[&("a".to_owned(), "c".to_owned())][0].line;
    assert_eq!(line_of_c, 3, "the line of the group member, not of `use`");
}

#[test]
fn inline_paths_in_code() {
    let a = "fn f(v: &[u8]) -> u32 {\n    let n = v.iter().copied().collect::<Vec<_>>().len();\n    crate::b::g(n) + crate::c::h::<u8>() + std::process::id()\n}\n";
    let files = [("lib.rs", FOUR), ("a.rs", a)];
    assert_eq!(edge_set(&files), set(&[("a", "b"), ("a", "c")]));
}

#[test]
fn comments_and_literals_are_not_references() {
    let a = concat!(
        "// use crate::b;\n",
        "/// See crate::c::f.\n",
        "/* crate::b /* nested */ crate::c */\n",
        "const S: &str = \"crate::b::x \\\" crate::c\";\n",
        "const R: &str = r#\"crate::c \" crate::b\"#;\n",
        "fn g<'a>(x: &'a str) -> char { if x.is_empty() { '{' } else { '\\'' } }\n",
        "use crate::d::Y;\n",
    );
    let files = [("lib.rs", FOUR), ("a.rs", a)];
    assert_eq!(edge_set(&files), set(&[("a", "d")]));
}

#[test]
fn super_counts_only_where_it_leaves_the_top_level_module() {
    let root = "mod a;\nmod b;\npub struct Own;\n";
    let a = "mod inner;\npub struct Thing;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n";
    let inner =
        "use super::Thing;\nuse super::super::b::B;\nfn f() -> super::super::Own { todo!() }\n";
    let files = [("lib.rs", root), ("a/mod.rs", a), ("a/inner.rs", inner)];
    assert_eq!(edge_set(&files), set(&[("a", "b"), ("a", ROOT)]));
}

#[test]
fn names_the_root_imports_stand_for_their_module() {
    let root = "mod a;\nmod b;\npub use a::Thing;\npub struct Own;\nfn f() { b::g() }\n";
    let b = "use crate::{Thing, Own};\npub fn g() {}\n";
    let files = [("lib.rs", root), ("a.rs", ""), ("b.rs", b)];
    assert_eq!(
        edge_set(&files),
        set(&[("b", "a"), ("b", ROOT), (ROOT, "b")]),
        "`pub use` in the root is no edge; the root's own code is"
    );
}

fn graph(pairs: &[(&str, &str)]) -> Edges {
    pairs
        .iter()
        .map(|(a, b)| (((*a).to_owned(), (*b).to_owned()), Vec::new()))
        .collect()
}

#[test]
fn knots_list_the_cycles_without_a_shortcut() {
    let pairs = [
        ("a", "b"),
        ("b", "a"),
        ("b", "c"),
        ("c", "d"),
        ("d", "b"),
        ("d", "e"),
    ];
    let found = knots(&graph(&pairs));
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].members,
        ["a", "b", "c", "d"].map(String::from).into()
    );
    let cycles: Vec<String> = found[0].cycles.iter().map(|c| c.join(" -> ")).collect();
    assert_eq!(cycles, ["a -> b -> a", "b -> c -> d -> b"]);

    // b -> d is a shortcut across b -> c -> d -> b, which holds b -> d -> b: only that one is
    // listed for it.
    let found = knots(&graph(&[pairs.as_slice(), &[("b", "d")]].concat()));
    let cycles: Vec<String> = found[0].cycles.iter().map(|c| c.join(" -> ")).collect();
    assert_eq!(cycles, ["a -> b -> a", "b -> d -> b"]);

    assert!(knots(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
}
