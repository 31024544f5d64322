//! The compiled route table.
//!
//! Precedence (documented in docs/routing.md): exact host, then wildcard host (longer
//! suffix first), then routes without hosts; within a host class: exact path, then
//! `{param}` patterns (more literal segments first), then `/*` prefixes (longer first),
//! then regexes; then `priority` (higher first); then file order. A candidate whose
//! method or headers do not match is skipped.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use portico_config::pattern::{PathPattern, Segment};
use regex::{Regex, RegexSet};
use smallvec::SmallVec;

/// What the router needs to know about one route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub hosts: Vec<String>,
    pub paths: Vec<PathPattern>,
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub priority: i32,
}

/// Captured path parameters, as ranges into the matched path.
#[derive(Debug, Clone, Default)]
pub struct Params(SmallVec<[(Arc<str>, Range<usize>); 4]>);

impl Params {
    /// The value of capture `name` in `path` (the path given to [`Router::route`]).
    pub fn get<'p>(&self, path: &'p str, name: &str) -> Option<&'p str> {
        self.0
            .iter()
            .find(|(n, _)| &**n == name)
            .and_then(|(_, r)| path.get(r.clone()))
    }

    /// Every capture as (name, value).
    pub fn iter<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.0
            .iter()
            .filter_map(move |(n, r)| path.get(r.clone()).map(|v| (&**n, v)))
    }
}

/// The outcome of routing one request.
#[derive(Debug)]
pub enum Match {
    /// (The path's captures are written to the `params` given to [`Router::route`].)
    Found {
        /// Index of the route in the list given to [`Router::new`].
        route: usize,
        /// For `/*` matches: the length of the matched prefix (for `strip_prefix`).
        prefix_len: Option<usize>,
    },
    /// Some route matched host and path but none the method: the methods that would,
    /// and the first such route (its request-hygiene policies still run, e.g. CORS).
    MethodNotAllowed {
        allow: Vec<Method>,
        route: usize,
    },
    NotFound,
}

#[derive(Debug, Clone)]
struct Entry {
    route: usize,
    /// (class-specific specificity, priority, file order) — smaller sorts first.
    rank: (i64, i64, usize),
    names: Arc<[Arc<str>]>,
    prefix_len: usize,
}

#[derive(Debug, Default)]
struct Node {
    lit: HashMap<Box<str>, Node>,
    param: Option<Box<Node>>,
    terminal: Vec<Entry>,
    prefix: Vec<Entry>,
}

#[derive(Debug, Default)]
struct Table {
    exact: HashMap<Box<str>, Vec<Entry>>,
    tree: Node,
    regex_set: Option<RegexSet>,
    regexes: Vec<(Regex, Entry)>,
}

/// The compiled route table.
#[derive(Debug)]
pub struct Router {
    specs: Vec<RouteSpec>,
    exact_hosts: HashMap<Box<str>, Table>,
    wildcard_hosts: Vec<(Box<str>, Table)>,
    any_host: Table,
}

/// A path match found while scanning: borrowed, so collecting them copies little.
struct Candidate<'a> {
    entry: &'a Entry,
    caps: SmallVec<[Range<usize>; 4]>,
    prefix: Option<usize>,
}

impl Router {
    /// Build the table. Patterns must already be validated.
    pub fn new(specs: Vec<RouteSpec>) -> Result<Router, regex::Error> {
        let mut exact_hosts: HashMap<Box<str>, Table> = HashMap::new();
        let mut wildcard: HashMap<Box<str>, Table> = HashMap::new();
        let mut any_host = Table::default();
        for (idx, spec) in specs.iter().enumerate() {
            for pat in &spec.paths {
                if spec.hosts.is_empty() {
                    insert(&mut any_host, idx, spec.priority, pat);
                }
                for h in &spec.hosts {
                    let h = h.to_ascii_lowercase();
                    let t = match h.strip_prefix('*') {
                        Some(suffix) => wildcard.entry(suffix.into()).or_default(),
                        None => exact_hosts.entry(h.into()).or_default(),
                    };
                    insert(t, idx, spec.priority, pat);
                }
            }
        }
        let mut wildcard_hosts: Vec<(Box<str>, Table)> = wildcard.into_iter().collect();
        wildcard_hosts.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        for t in exact_hosts
            .values_mut()
            .chain(wildcard_hosts.iter_mut().map(|(_, t)| t))
        {
            finish(t)?;
        }
        finish(&mut any_host)?;
        Ok(Router {
            specs,
            exact_hosts,
            wildcard_hosts,
            any_host,
        })
    }

    /// Route a request. `host` is lower-case without port; `path` is normalized.
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
        params: &mut Params,
    ) -> Match {
        params.0.clear();
        let mut allow: Vec<Method> = Vec::new();
        let mut path_matched: Option<usize> = None;
        let host = host.unwrap_or("");
        {
            let mut scan = |t: &Table| {
                self.scan(
                    t,
                    path,
                    method,
                    headers,
                    (&mut allow, &mut path_matched),
                    params,
                )
            };
            if let Some(t) = self.exact_hosts.get(host) {
                if let Some(m) = scan(t) {
                    return m;
                }
            }
            for (suffix, t) in &self.wildcard_hosts {
                // `*.example.org` matches any name ending in `.example.org` (one or more labels).
                if host.len() > suffix.len() && host.ends_with(&**suffix) {
                    if let Some(m) = scan(t) {
                        return m;
                    }
                }
            }
            if let Some(m) = scan(&self.any_host) {
                return m;
            }
        }
        if let (Some(route), false) = (path_matched, allow.is_empty()) {
            allow.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            allow.dedup();
            return Match::MethodNotAllowed { allow, route };
        }
        Match::NotFound
    }

    fn scan(
        &self,
        t: &Table,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
        (allow, path_matched): (&mut Vec<Method>, &mut Option<usize>),
        params: &mut Params,
    ) -> Option<Match> {
        // Exact paths first: most requests stop here without walking the trie.
        if let Some(es) = t.exact.get(path) {
            for e in es {
                if self.accepts(e, method, headers, allow, path_matched) {
                    return Some(Match::Found {
                        route: e.route,
                        prefix_len: None,
                    });
                }
            }
        }
        let mut params_found: SmallVec<[Candidate<'_>; 4]> = SmallVec::new();
        let mut prefix_found: SmallVec<[Candidate<'_>; 4]> = SmallVec::new();
        let mut segs: SmallVec<[Range<usize>; 16]> = SmallVec::new();
        segments(path, &mut segs);
        walk(
            &t.tree,
            path,
            &segs,
            0,
            &mut SmallVec::new(),
            &mut params_found,
            &mut prefix_found,
        );
        params_found.sort_by_key(|c| c.entry.rank);
        prefix_found.sort_by_key(|c| c.entry.rank);
        for c in params_found.iter().chain(prefix_found.iter()) {
            if self.accepts(c.entry, method, headers, allow, path_matched) {
                for (n, r) in c.entry.names.iter().zip(c.caps.iter()) {
                    params.0.push((n.clone(), r.clone()));
                }
                return Some(Match::Found {
                    route: c.entry.route,
                    prefix_len: c.prefix,
                });
            }
        }
        if let Some(set) = &t.regex_set {
            let mut hits: SmallVec<[usize; 8]> = set.matches(path).into_iter().collect();
            hits.sort_by_key(|&i| t.regexes[i].1.rank);
            for i in hits {
                let (re, e) = &t.regexes[i];
                if !self.accepts(e, method, headers, allow, path_matched) {
                    continue;
                }
                if let Some(caps) = re.captures(path) {
                    for name in e.names.iter() {
                        if let Some(m) = caps.name(name) {
                            params.0.push((name.clone(), m.range()));
                        }
                    }
                }
                return Some(Match::Found {
                    route: e.route,
                    prefix_len: None,
                });
            }
        }
        None
    }

    /// Whether the route of a path match also accepts the headers and method; records
    /// the methods that would have matched for a 405.
    fn accepts(
        &self,
        e: &Entry,
        method: &Method,
        headers: &HeaderMap,
        allow: &mut Vec<Method>,
        path_matched: &mut Option<usize>,
    ) -> bool {
        let spec = &self.specs[e.route];
        if !spec
            .headers
            .iter()
            .all(|(n, v)| headers.get_all(n).iter().any(|h| h == v))
        {
            return false;
        }
        if !spec.methods.is_empty() && !spec.methods.contains(method) {
            path_matched.get_or_insert(e.route);
            allow.extend(spec.methods.iter().cloned());
            return false;
        }
        true
    }
}

/// The byte ranges of `path`'s segments, into `out` (filled in place: it is large).
fn segments(path: &str, out: &mut SmallVec<[Range<usize>; 16]>) {
    let mut start = 1;
    for (i, b) in path.bytes().enumerate().skip(1) {
        if b == b'/' {
            out.push(start..i);
            start = i + 1;
        }
    }
    out.push(start..path.len());
}

fn walk<'a>(
    node: &'a Node,
    path: &str,
    segs: &[Range<usize>],
    depth: usize,
    caps: &mut SmallVec<[Range<usize>; 4]>,
    params_out: &mut SmallVec<[Candidate<'a>; 4]>,
    prefix_out: &mut SmallVec<[Candidate<'a>; 4]>,
) {
    for e in &node.prefix {
        prefix_out.push(Candidate {
            entry: e,
            caps: SmallVec::new(),
            prefix: Some(e.prefix_len),
        });
    }
    if depth == segs.len() {
        for e in &node.terminal {
            params_out.push(Candidate {
                entry: e,
                caps: caps.clone(),
                prefix: None,
            });
        }
        return;
    }
    let r = segs[depth].clone();
    let seg = &path[r.clone()];
    if let Some(child) = node.lit.get(seg) {
        walk(child, path, segs, depth + 1, caps, params_out, prefix_out);
    }
    if let Some(child) = &node.param {
        if !seg.is_empty() {
            caps.push(r);
            walk(child, path, segs, depth + 1, caps, params_out, prefix_out);
            caps.pop();
        }
    }
}

fn insert(t: &mut Table, route: usize, priority: i32, pat: &PathPattern) {
    let prio = -i64::from(priority);
    match pat {
        PathPattern::Exact(p) => t.exact.entry(p.as_str().into()).or_default().push(Entry {
            route,
            rank: (0, prio, route),
            names: Arc::from(Vec::new()),
            prefix_len: 0,
        }),
        PathPattern::Params(segs) => {
            let mut node = &mut t.tree;
            let mut names: Vec<Arc<str>> = Vec::new();
            let mut literals = 0i64;
            for s in segs {
                node = match s {
                    Segment::Lit(l) => {
                        literals += 1;
                        node.lit.entry(l.as_str().into()).or_default()
                    }
                    Segment::Param(n) => {
                        names.push(n.as_str().into());
                        node.param.get_or_insert_with(Default::default)
                    }
                };
            }
            node.terminal.push(Entry {
                route,
                rank: (-literals, prio, route),
                names: names.into(),
                prefix_len: 0,
            });
        }
        PathPattern::Prefix(p) => {
            let mut node = &mut t.tree;
            if !p.is_empty() {
                for l in p.split('/').skip(1) {
                    node = node.lit.entry(l.into()).or_default();
                }
            }
            node.prefix.push(Entry {
                route,
                rank: (-(p.len() as i64), prio, route),
                names: Arc::from(Vec::new()),
                prefix_len: p.len(),
            });
        }
        PathPattern::Regex(re) => {
            // Validated when the configuration was loaded.
            if let Ok(compiled) = Regex::new(re) {
                let names: Vec<Arc<str>> =
                    compiled.capture_names().flatten().map(Arc::from).collect();
                t.regexes.push((
                    compiled,
                    Entry {
                        route,
                        rank: (0, prio, route),
                        names: names.into(),
                        prefix_len: 0,
                    },
                ));
            }
        }
    }
}

fn finish(t: &mut Table) -> Result<(), regex::Error> {
    for es in t.exact.values_mut() {
        es.sort_by_key(|e| e.rank);
    }
    if !t.regexes.is_empty() {
        t.regex_set = Some(RegexSet::new(t.regexes.iter().map(|(r, _)| r.as_str()))?);
    }
    Ok(())
}
