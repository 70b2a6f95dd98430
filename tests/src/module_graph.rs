//! The dependency graph between a crate's top-level modules, read from its source, and the cycles
//! in it. A top-level module is one the crate root declares (`mod x;`, `mod x { … }`): the file
//! `x.rs` or `x/mod.rs` and everything under the folder `x/`. The root itself is the node
//! [`ROOT`], for the items it defines; a name the root only imports (`pub use x::Thing`) stands
//! for module `x`.
//!
//! Edges come from paths that name another top-level module: `crate::x…` (in `use` trees, groups
//! and nested groups included, and inline in code), `super::…` that climbs out of a top-level
//! module, and in the root, `x::…`. Comments, string and character literals are skipped. Macros
//! are not expanded, and `#[path]` attributes are not followed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The node for the crate root's own items.
pub const ROOT: &str = "crate";

/// One source file of a crate.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Its module path from the crate root: `[]` for the root, `["x", "y"]` for `x/y.rs`.
    pub module: Vec<String>,
    /// What the report calls it (a path relative to the repository).
    pub label: String,
    pub text: String,
}

/// Where a reference is written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Site {
    pub file: String,
    pub line: usize,
}

/// `(from, to)` → every place that makes the edge, in source order.
pub type Edges = BTreeMap<(String, String), Vec<Site>>;

/// The module path of a file at `relative` (to the folder of the crate root, `/`-separated).
pub fn module_of(relative: &str) -> Vec<String> {
    let stem = relative.strip_suffix(".rs").unwrap_or(relative);
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The modules a crate root declares at its top level, in order.
pub fn declared_modules(root: &str) -> Vec<String> {
    scan(root, &[]).declared
}

/// The edges between the top-level modules of one crate; `files` holds the root (module `[]`)
/// and the files of its top-level modules.
pub fn edges(files: &[SourceFile]) -> Edges {
    let scans: Vec<(&SourceFile, Scan)> = files
        .iter()
        .map(|f| (f, scan(&f.text, &f.module)))
        .collect();
    let Some((_, root)) = scans.iter().find(|(f, _)| f.module.is_empty()) else {
        return Edges::new();
    };
    let modules: BTreeSet<&str> = root.declared.iter().map(String::as_str).collect();
    // Names the root binds with `use`: `crate::Name` then means the module it came from.
    let mut imported: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &root.refs {
        if let (Some(name), true, Some(first)) = (&r.binding, r.from.is_empty(), r.to.first()) {
            if modules.contains(first.as_str()) {
                imported.insert(name, first);
            }
        }
    }
    let mut out = Edges::new();
    for (file, s) in &scans {
        for r in &s.refs {
            let from = r.from.first().map_or(ROOT, String::as_str);
            // The root's `pub use` only passes a name on; it is no dependency of the root's items.
            if from == ROOT && r.public_use {
                continue;
            }
            let to = match r.to.first() {
                None => ROOT,
                Some(m) if modules.contains(m.as_str()) => m,
                Some(name) if r.anchored => imported.get(name.as_str()).copied().unwrap_or(ROOT),
                Some(_) => continue,
            };
            if from != to {
                out.entry((from.to_owned(), to.to_owned()))
                    .or_default()
                    .push(Site {
                        file: file.label.clone(),
                        line: r.line,
                    });
            }
        }
    }
    out
}

/// Modules that all depend on one another (a strongly connected component of more than one
/// node), with the cycles to cut.
#[derive(Debug)]
pub struct Knot {
    pub members: BTreeSet<String>,
    /// The shortest cycle through each edge inside the knot, kept only when no other edge joins
    /// two of its nodes: a cycle with a shortcut holds a shorter one, which is listed instead.
    /// Cutting the short cycles can leave a long one, which a second run then lists. Each is
    /// listed from its smallest node and ends where it starts: `["a", "b", "a"]`.
    pub cycles: Vec<Vec<String>>,
}

/// The knots among `edges`; none when the modules form a hierarchy.
pub fn knots(edges: &Edges) -> Vec<Knot> {
    let mut out = Vec::new();
    for members in strongly_connected(edges) {
        if members.len() < 2 {
            continue;
        }
        let inside = |n: &str| members.contains(n);
        let mut cycles = BTreeSet::new();
        for (from, to) in edges.keys() {
            if !inside(from) || !inside(to) {
                continue;
            }
            if let Some(path) = shortest_path(edges, to, from, &inside) {
                let mut cycle = vec![from.clone()];
                cycle.extend(path);
                if chordless(edges, &cycle) {
                    cycles.insert(rotate_to_smallest(cycle));
                }
            }
        }
        out.push(Knot {
            members,
            cycles: cycles.into_iter().collect(),
        });
    }
    out
}

/// Whether every edge between nodes of `cycle` is one of its steps.
fn chordless(edges: &Edges, cycle: &[String]) -> bool {
    let steps: BTreeSet<(&String, &String)> = cycle.windows(2).map(|w| (&w[0], &w[1])).collect();
    edges
        .keys()
        .filter(|(a, b)| cycle.contains(a) && cycle.contains(b))
        .all(|(a, b)| steps.contains(&(a, b)))
}

/// Tarjan's algorithm over the nodes of `edges`.
pub fn strongly_connected(edges: &Edges) -> Vec<BTreeSet<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
        next.entry(to).or_default();
    }
    let mut t = Tarjan {
        next: &next,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for &n in next.keys() {
        if !t.index.contains_key(n) {
            t.visit(n);
        }
    }
    t.components
}

struct Tarjan<'a> {
    next: &'a BTreeMap<&'a str, Vec<&'a str>>,
    index: BTreeMap<&'a str, usize>,
    low: BTreeMap<&'a str, usize>,
    stack: Vec<&'a str>,
    on_stack: BTreeSet<&'a str>,
    components: Vec<BTreeSet<String>>,
}

impl<'a> Tarjan<'a> {
    // Recursive: a crate has tens of top-level modules, not thousands.
    fn visit(&mut self, n: &'a str) {
        let i = self.index.len();
        self.index.insert(n, i);
        self.low.insert(n, i);
        self.stack.push(n);
        self.on_stack.insert(n);
        for &m in self.next.get(n).into_iter().flatten() {
            if !self.index.contains_key(m) {
                self.visit(m);
                let low = self.low[n].min(self.low[m]);
                self.low.insert(n, low);
            } else if self.on_stack.contains(m) {
                let low = self.low[n].min(self.index[m]);
                self.low.insert(n, low);
            }
        }
        if self.low[n] == self.index[n] {
            let mut component = BTreeSet::new();
            while let Some(m) = self.stack.pop() {
                self.on_stack.remove(m);
                component.insert(m.to_owned());
                if m == n {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

/// Breadth-first from `from` to `to` through nodes that are `inside`; both ends are in the path.
fn shortest_path(
    edges: &Edges,
    from: &str,
    to: &str,
    inside: &dyn Fn(&str) -> bool,
) -> Option<Vec<String>> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(n) = queue.pop_front() {
        if n == to {
            let mut path = vec![to.to_owned()];
            let mut at = to;
            while at != from {
                at = came_from[at];
                path.push(at.to_owned());
            }
            path.reverse();
            return Some(path);
        }
        for (a, b) in edges.keys() {
            if a == n && inside(b) && b != from && !came_from.contains_key(b.as_str()) {
                came_from.insert(b, n);
                queue.push_back(b);
            }
        }
    }
    None
}

fn rotate_to_smallest(mut cycle: Vec<String>) -> Vec<String> {
    cycle.pop();
    let at = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap_or(0);
    cycle.rotate_left(at);
    if let Some(first) = cycle.first().cloned() {
        cycle.push(first);
    }
    cycle
}

/// A path written in a file, resolved against the module it is written in.
#[derive(Debug)]
struct Reference {
    /// The module it is written in (inline `mod` blocks included), from the crate root.
    from: Vec<String>,
    /// What it names, from the crate root; `[]` is the root itself (`use super::*` at the top).
    to: Vec<String>,
    /// It began with `crate`, `self` or `super`, so `to` is in this crate for certain.
    anchored: bool,
    /// The name a `use` binds (`None` for a glob or an inline path).
    binding: Option<String>,
    public_use: bool,
    line: usize,
}

#[derive(Debug, Default)]
struct Scan {
    /// `mod` items at the top level of the file.
    declared: Vec<String>,
    refs: Vec<Reference>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident(t: Option<&Token>, s: &str) -> bool {
    matches!(t, Some(Token { tok: Tok::Ident(i), .. }) if i == s)
}

fn is_punct(t: Option<&Token>, c: char) -> bool {
    matches!(t, Some(Token { tok: Tok::Punct(p), .. }) if *p == c)
}

fn is_sep(t: Option<&Token>) -> bool {
    matches!(
        t,
        Some(Token {
            tok: Tok::PathSep,
            ..
        })
    )
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t {
        Some(Token {
            tok: Tok::Ident(i), ..
        }) => Some(i),
        _ => None,
    }
}

fn scan(text: &str, module: &[String]) -> Scan {
    let toks = lex(text);
    let mut out = Scan::default();
    let mut depth = 0;
    // Inline `mod name { … }` blocks we are in, with the depth of their opening brace.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut opening_mod: Option<String> = None;
    let here = |inline: &[(String, usize)]| -> Vec<String> {
        let mut m = module.to_vec();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    let mut i = 0;
    while i < toks.len() {
        let prev = i.checked_sub(1).and_then(|p| toks.get(p));
        match &toks[i].tok {
            Tok::Punct('{') => {
                depth += 1;
                if let Some(name) = opening_mod.take() {
                    inline.push((name, depth));
                }
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let Some(name) = ident(toks.get(i + 1)) {
                    if depth == 0 {
                        out.declared.push(name.to_owned());
                    }
                    if is_punct(toks.get(i + 2), '{') {
                        opening_mod = Some(name.to_owned());
                    }
                }
                i += 2;
            }
            Tok::Ident(kw) if kw == "use" => {
                let public_use = is_public(&toks, i);
                let from = here(&inline);
                let mut leaves = Vec::new();
                i = use_tree(&toks, i + 1, Vec::new(), &mut leaves);
                for leaf in leaves {
                    if let Some((to, anchored)) = resolve(&leaf.path, &from) {
                        out.refs.push(Reference {
                            from: from.clone(),
                            to,
                            anchored,
                            binding: leaf.binding,
                            public_use,
                            line: leaf.line,
                        });
                    }
                }
            }
            // A path in code: `a::b…` not inside another path and not a method's turbofish.
            Tok::Ident(_) if is_sep(toks.get(i + 1)) && !is_sep(prev) && !is_punct(prev, '.') => {
                let line = toks[i].line;
                let mut path = Vec::new();
                while let Some(seg) = ident(toks.get(i)) {
                    path.push(seg.to_owned());
                    i += 1;
                    if !is_sep(toks.get(i)) {
                        break;
                    }
                    i += 1;
                }
                // `$crate::x` in a macro is `crate::x`: the `$` is already behind us.
                let from = here(&inline);
                if let Some((to, anchored)) = resolve(&path, &from) {
                    out.refs.push(Reference {
                        from,
                        to,
                        anchored,
                        binding: None,
                        public_use: false,
                        line,
                    });
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Whether the `use` at `at` has a visibility: `pub` or `pub(…)`.
fn is_public(toks: &[Token], at: usize) -> bool {
    let Some(mut i) = at.checked_sub(1) else {
        return false;
    };
    if is_punct(toks.get(i), ')') {
        while i > 0 && !is_punct(toks.get(i), '(') {
            i -= 1;
        }
        let Some(before) = i.checked_sub(1) else {
            return false;
        };
        i = before;
    }
    is_ident(toks.get(i), "pub")
}

struct Leaf {
    path: Vec<String>,
    binding: Option<String>,
    line: usize,
}

/// Parses one use tree from `i` with the segments before it in `prefix`; returns the index after
/// it (at the `,`, `}` or `;` that ends it).
fn use_tree(toks: &[Token], mut i: usize, mut path: Vec<String>, out: &mut Vec<Leaf>) -> usize {
    let mut line = toks.get(i).map_or(0, |t| t.line);
    if path.is_empty() && is_sep(toks.get(i)) {
        // `use ::name` is always another crate.
        path.push("::".to_owned());
    }
    loop {
        let t = toks.get(i);
        if let Some(seg) = ident(t) {
            if seg == "as" {
                let binding = ident(toks.get(i + 1)).map(str::to_owned);
                out.push(Leaf {
                    path,
                    binding,
                    line,
                });
                return i + 2;
            }
            path.push(seg.to_owned());
            line = t.map_or(line, |t| t.line);
            i += 1;
        } else if is_sep(t) {
            i += 1;
        } else if is_punct(t, '*') {
            out.push(Leaf {
                path,
                binding: None,
                line,
            });
            return i + 1;
        } else if is_punct(t, '{') {
            i += 1;
            while i < toks.len() && !is_punct(toks.get(i), '}') {
                i = use_tree(toks, i, path.clone(), out);
                if is_punct(toks.get(i), ',') {
                    i += 1;
                }
            }
            return i + 1;
        } else {
            if path.last().is_some_and(|s| s == "self") {
                path.pop();
            }
            let binding = path.last().cloned();
            out.push(Leaf {
                path,
                binding,
                line,
            });
            return i;
        }
    }
}

/// `path` as written in module `from`, from the crate root; `None` for another crate's path or
/// one that climbs above the root. The flag tells whether it began with `crate`/`self`/`super`.
fn resolve(path: &[String], from: &[String]) -> Option<(Vec<String>, bool)> {
    let first = path.first()?;
    if first == "::" {
        return None;
    }
    let mut base = from.to_vec();
    let mut rest = path;
    let anchored = matches!(first.as_str(), "crate" | "self" | "super");
    if first == "crate" {
        base.clear();
        rest = &path[1..];
    } else if first == "self" {
        rest = &path[1..];
    }
    while rest.first().is_some_and(|s| s == "super") {
        base.pop()?;
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some((base, anchored))
}

/// Identifiers, `::` and single punctuation; comments and literals are dropped.
fn lex(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let is_ident_start = |ch: char| ch == '_' || ch.is_alphabetic();
    let is_ident_char = |ch: char| ch == '_' || ch.is_alphanumeric();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut nesting = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    nesting += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    nesting -= 1;
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    line += usize::from(c[i] == '\n');
                    i += 1;
                }
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                line += usize::from(at(i) == '\n');
                i += 1;
            }
            i += 1;
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                // Past the quote, the backslash and the escaped character, to the closing quote.
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or a loop label.
                i += 1;
                while is_ident_char(at(i)) {
                    i += 1;
                }
            }
        } else if is_ident_start(ch) {
            let start = i;
            while is_ident_char(at(i)) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            if raw_prefix && (at(i) == '"' || at(i) == '#') {
                let mut hashes = 0;
                while at(i + hashes) == '#' {
                    hashes += 1;
                }
                if at(i + hashes) == '"' {
                    i += hashes + 1;
                    while i < c.len() {
                        if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                            i += hashes + 1;
                            break;
                        }
                        line += usize::from(c[i] == '\n');
                        i += 1;
                    }
                    continue;
                }
                if word == "r" && hashes == 1 && is_ident_start(at(i + 1)) {
                    // A raw identifier, `r#type`.
                    i += 1;
                    let start = i;
                    while is_ident_char(at(i)) {
                        i += 1;
                    }
                    out.push(Token {
                        tok: Tok::Ident(c[start..i].iter().collect()),
                        line,
                    });
                    continue;
                }
            }
            // `b"…"`, `c"…"` and `b'…'` lex as a stray identifier before the literal.
            out.push(Token {
                tok: Tok::Ident(word),
                line,
            });
        } else if ch.is_ascii_digit() {
            while is_ident_char(at(i)) {
                i += 1;
            }
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}
