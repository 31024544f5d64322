//! Loading: YAML → schema check (every structural problem at once) → typed model →
//! semantic checks (cross references, patterns, addresses). Every problem is reported
//! with its file, line, column and key path.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use jsonschema::error::ValidationErrorKind;
use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde_json::{json, Value};

use crate::diag::{closest, Diagnostic, Diagnostics, KeyPath};
use crate::grammar::{Template, Var};
use crate::model::Config;
use crate::pattern::PathPattern;
use crate::yaml::{self, Positions};

/// What the configuration layer needs to know about policies (implemented by the plugin registry).
pub trait PluginCatalog: Send + Sync {
    /// Every known policy name.
    fn names(&self) -> Vec<&'static str>;
    /// The JSON Schema of a policy's settings (without the common `enabled` key).
    fn schema(&self, name: &str, gen: &mut SchemaGenerator) -> Option<Schema>;
    /// Check settings fully (typed parse and semantic rules); problems carry a key path
    /// relative to the settings object. Default: no extra checks.
    fn check(&self, name: &str, settings: &Value) -> Vec<(KeyPath, String)> {
        let _ = (name, settings);
        Vec::new()
    }
    /// Whether the policy answers requests itself, so its route needs no upstream.
    /// Default: false.
    fn answers_itself(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}

/// A configuration that passed validation, with what is needed to locate later problems.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub positions: Positions,
    /// The file it came from (`None` for built-in defaults).
    pub file: Option<PathBuf>,
    /// Directory relative paths (certificates) resolve against.
    pub base_dir: PathBuf,
}

impl Loaded {
    /// Attach file and position to a problem found after loading (e.g. while compiling).
    pub fn locate(&self, mut d: Diagnostic) -> Diagnostic {
        d.file = self.file.as_ref().map(|f| f.display().to_string());
        if d.pos.is_none() {
            d.pos = self.positions.value(&d.path);
        }
        d
    }

    /// Resolve a path from the config relative to its directory.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// The JSON Schema of the whole configuration, with every policy's settings.
pub fn schema(catalog: &dyn PluginCatalog) -> Value {
    let mut gen = SchemaSettings::draft2020_12().into_generator();
    let mut plugins = serde_json::Map::new();
    for name in catalog.names() {
        let mut s = catalog
            .schema(name, &mut gen)
            .map(Schema::to_value)
            .unwrap_or_else(|| json!({"type": "object"}));
        if let Some(obj) = s.as_object_mut() {
            let props = obj.entry("properties").or_insert_with(|| json!({}));
            if let Some(p) = props.as_object_mut() {
                p.insert(
                    "enabled".into(),
                    json!({"type": "boolean", "description": "false removes this policy (on a route: removes the global one)."}),
                );
            }
            // `name:` with no settings is read as `{}`.
            if obj.get("type") == Some(&json!("object")) {
                obj.insert("type".into(), json!(["object", "null"]));
            }
            // `enabled: false` needs no other settings (it only removes the policy).
            if let Some(req) = obj.remove("required") {
                obj.insert(
                    "if".into(),
                    json!({"type": "object", "properties": {"enabled": {"const": false}}, "required": ["enabled"]}),
                );
                obj.insert("else".into(), json!({ "required": req }));
            }
        }
        plugins.insert(name.to_string(), s);
    }
    let plugins_schema = json!({
        "type": "object",
        "description": "Policies: a map from policy name to its settings.",
        "properties": plugins,
        "additionalProperties": false
    });
    let mut root = gen.root_schema_for::<Config>().to_value();
    if let Some(p) = root.pointer_mut("/properties/plugins") {
        *p = plugins_schema.clone();
    }
    if let Some(p) = root.pointer_mut("/$defs/Route/properties/plugins") {
        *p = plugins_schema;
    }
    root
}

/// Load and validate a configuration file.
pub fn load_file(path: &Path, catalog: &dyn PluginCatalog) -> Result<Loaded, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut d = Diagnostic::new(KeyPath::root(), format!("cannot read the file: {e}"));
        d.file = Some(path.display().to_string());
        Diagnostics(vec![d])
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    load_str(&text, Some(path), base, catalog)
}

/// Load and validate configuration text.
pub fn load_str(
    text: &str,
    file: Option<&Path>,
    base_dir: PathBuf,
    catalog: &dyn PluginCatalog,
) -> Result<Loaded, Diagnostics> {
    let file_name = file.map(|f| f.display().to_string());
    let finish = |diags: Vec<Diagnostic>, positions: &Positions| {
        let mut out: Vec<Diagnostic> = diags
            .into_iter()
            .map(|mut d| {
                d.file.clone_from(&file_name);
                if d.pos.is_none() {
                    d.pos = positions.value(&d.path);
                }
                d
            })
            .collect();
        out.sort_by_key(|d| d.pos.map(|p| (p.line, p.col)));
        out.dedup();
        Diagnostics(out)
    };
    let (mut value, positions) = match yaml::parse(text) {
        Ok(v) => v,
        Err(d) => return Err(finish(vec![d], &Positions::default())),
    };
    if value.is_null() {
        value = json!({});
    }
    let (mut diags, prune) = schema_check(&value, &positions, catalog);
    if !diags.is_empty() {
        // Also report what the later checks find in the parts the schema accepted, so
        // that one run shows every problem (not only the structural ones).
        if let Some(partial) = partial_config(&value, &prune) {
            let bad: Vec<String> = diags.iter().map(|d| d.path.to_string()).collect();
            let mut more = Vec::new();
            semantic_check(&partial, catalog, &mut more);
            diags.extend(more.into_iter().filter(|d| !under_any(&d.path, &bad)));
        }
        return Err(finish(diags, &positions));
    }
    let config: Config = match serde_path_to_error::deserialize(&value) {
        Ok(c) => c,
        Err(e) => {
            let path = KeyPath::parse(&e.path().to_string());
            let d = Diagnostic::new(path, e.inner().to_string());
            return Err(finish(vec![d], &positions));
        }
    };
    semantic_check(&config, catalog, &mut diags);
    if !diags.is_empty() {
        return Err(finish(diags, &positions));
    }
    Ok(Loaded {
        config,
        positions,
        file: file.map(Path::to_path_buf),
        base_dir,
    })
}

/// Structural problems, and the JSON pointers of the values to drop before the
/// semantic checks look at the rest ([`partial_config`]).
fn schema_check(
    value: &Value,
    positions: &Positions,
    catalog: &dyn PluginCatalog,
) -> (Vec<Diagnostic>, Vec<String>) {
    let schema = schema(catalog);
    let validator = match jsonschema::validator_for(&schema) {
        Ok(v) => v,
        Err(e) => {
            return (
                vec![Diagnostic::new(
                    KeyPath::root(),
                    format!("internal schema error: {e}"),
                )],
                Vec::new(),
            )
        }
    };
    let mut out = Vec::new();
    let mut prune = Vec::new();
    for err in validator.iter_errors(value) {
        report(&err, &schema, positions, &mut out, &mut prune);
    }
    (out, prune)
}

/// Turn one schema error into diagnostics (and values to prune).
fn report(
    err: &jsonschema::ValidationError<'_>,
    schema: &Value,
    positions: &Positions,
    out: &mut Vec<Diagnostic>,
    prune: &mut Vec<String>,
) {
    let pointer = err.instance_path().as_str();
    let path = KeyPath::from_pointer(pointer);
    match err.kind() {
        // An optional value (`anyOf: [X, null]`) that is not null: report why it is not
        // an X, with the precise location, instead of "not valid under any of the schemas".
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context }
            if optional_branch(context).is_some() =>
        {
            for e in optional_branch(context).unwrap_or_default() {
                report(e, schema, positions, out, prune);
            }
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed = allowed_keys(schema, err.schema_path().as_str());
            for key in unexpected {
                prune.push(format!(
                    "{pointer}/{}",
                    key.replace('~', "~0").replace('/', "~1")
                ));
                let kp = path.key(key);
                let what = if path.to_string().ends_with("plugins") {
                    "unknown policy"
                } else {
                    "unknown key"
                };
                let mut d = Diagnostic::new(kp.clone(), format!("{what} `{key}`"));
                if let Some(pos) = positions.key(&kp) {
                    d = d.at(pos);
                }
                d = d.suggest(key, allowed.iter().map(String::as_str));
                out.push(d);
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            out.push(Diagnostic::new(
                path,
                format!("missing required key `{name}`"),
            ));
        }
        _ => {
            // One message per value (a value can fail `type` and `enum` at once).
            if !prune.iter().any(|p| p == pointer) {
                prune.push(pointer.to_string());
                out.push(value_problem(err, schema, path));
            }
        }
    }
}

/// For `anyOf`/`oneOf` failures where every branch but one only says "expected null"
/// (an `Option`), the errors of that one branch.
fn optional_branch<'a, 'e>(
    context: &'a [Vec<jsonschema::ValidationError<'e>>],
) -> Option<&'a [jsonschema::ValidationError<'e>]> {
    let expects_null = |errs: &Vec<jsonschema::ValidationError<'_>>| {
        matches!(errs.as_slice(), [e] if matches!(
            e.kind(),
            ValidationErrorKind::Type { kind: jsonschema::error::TypeKind::Single(t) }
                if t.as_str() == "null"
        ))
    };
    let rest: Vec<&Vec<jsonschema::ValidationError<'e>>> =
        context.iter().filter(|e| !expects_null(e)).collect();
    match rest.as_slice() {
        [one] if rest.len() < context.len() && !one.is_empty() => Some(one.as_slice()),
        _ => None,
    }
}

/// A readable message (and hint) for a value the schema rejected.
fn value_problem(
    err: &jsonschema::ValidationError<'_>,
    schema: &Value,
    path: KeyPath,
) -> Diagnostic {
    let sp = err.schema_path().as_str();
    let inst: &Value = err.instance();
    if sp.starts_with("/$defs/Duration/") {
        let msg = match inst.as_str() {
            Some(s) => crate::units::parse_duration(s)
                .err()
                .unwrap_or_else(|| format!("`{s}` is not a valid duration")),
            None => format!(
                "expected a duration such as `2s` or `1m30s`, found {}",
                show(inst)
            ),
        };
        return Diagnostic::new(path, msg);
    }
    if sp.starts_with("/$defs/ByteSize/") {
        let msg = match inst.as_str() {
            Some(s) => crate::units::parse_size(s)
                .err()
                .unwrap_or_else(|| format!("`{s}` is not a valid size")),
            None => format!(
                "expected a size such as `10MiB` or a number of bytes, found {}",
                show(inst)
            ),
        };
        return Diagnostic::new(path, msg);
    }
    if sp.starts_with("/$defs/ScalarSchema/") {
        return Diagnostic::new(
            path,
            format!("expected a string, number or boolean, found {}", show(inst)),
        );
    }
    let one_of = |options: Vec<String>| {
        let list = options
            .iter()
            .map(|o| format!("`{o}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let d = Diagnostic::new(path.clone(), format!("{} is not one of {list}", show(inst)));
        match inst {
            Value::String(s) => d.suggest(s, options.iter().map(String::as_str)),
            Value::Number(n) if options.contains(&n.to_string()) => {
                d.hint(format!("quote it: `\"{n}\"`"))
            }
            _ => d,
        }
    };
    match err.kind() {
        ValidationErrorKind::Enum { options } => {
            let opts: Vec<String> = options
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            one_of(opts)
        }
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => {
            let consts: Option<Vec<String>> = context
                .iter()
                .map(|errs| match errs.as_slice() {
                    [e] => match e.kind() {
                        ValidationErrorKind::Constant { expected_value } => {
                            expected_value.as_str().map(str::to_string)
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            match consts {
                Some(c) if !c.is_empty() => one_of(c),
                _ => Diagnostic::new(path, shorten(&err.to_string())),
            }
        }
        // e.g. `min_version: 1.3` where the enum holds the string "1.3".
        ValidationErrorKind::Type { .. }
            if !inst.is_string() && !enum_of(schema, sp).is_empty() =>
        {
            let opts = enum_of(schema, sp);
            if opts.contains(&inst.to_string()) {
                one_of(opts)
            } else {
                Diagnostic::new(
                    path,
                    format!(
                        "{} is not one of {}",
                        show(inst),
                        opts.iter()
                            .map(|o| format!("`{o}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        }
        ValidationErrorKind::Type { kind } => {
            let types: Vec<jsonschema::types::JsonType> = match kind {
                jsonschema::error::TypeKind::Single(t) => vec![*t],
                jsonschema::error::TypeKind::Multiple(set) => set.iter().collect(),
            };
            let wanted: Vec<&str> = types
                .iter()
                .filter_map(|t| match t.as_str() {
                    "array" => Some("a list"),
                    "object" => Some("a mapping"),
                    "string" => Some("a string"),
                    "integer" => Some("an integer"),
                    "number" => Some("a number"),
                    "boolean" => Some("`true` or `false`"),
                    _ => None,
                })
                .collect();
            Diagnostic::new(
                path,
                format!("expected {}, found {}", wanted.join(" or "), show(inst)),
            )
        }
        ValidationErrorKind::Minimum { limit } => Diagnostic::new(
            path,
            format!("{} is too small: the minimum is {limit}", show(inst)),
        ),
        ValidationErrorKind::Maximum { limit } => Diagnostic::new(
            path,
            format!("{} is too large: the maximum is {limit}", show(inst)),
        ),
        _ => Diagnostic::new(path, shorten(&err.to_string())),
    }
}

/// The string options of the `enum` next to a failed `type` keyword at `schema_path`.
fn enum_of(schema: &Value, schema_path: &str) -> Vec<String> {
    schema_path
        .strip_suffix("/type")
        .and_then(|parent| schema.pointer(parent))
        .and_then(|n| n.get("enum"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A value as quoted in messages.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        Value::Null => "nothing (null)".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
        other => format!("`{other}`"),
    }
}

/// Whether `path` is one of `bad` or below one of them.
fn under_any(path: &KeyPath, bad: &[String]) -> bool {
    let p = path.to_string();
    bad.iter().any(|b| {
        p == *b
            || p.strip_prefix(b.as_str())
                .is_some_and(|rest| rest.starts_with(['.', '[']))
    })
}

/// A best-effort model of a configuration the schema rejected, so that the semantic
/// checks can still look at the rest: rejected values are dropped (their defaults
/// apply), a policy with a rejected setting is treated as disabled, and a route or
/// upstream that still does not parse becomes an inert placeholder (keeping indexes
/// and names, so no problem is reported at the wrong place or invented).
fn partial_config(value: &Value, prune: &[String]) -> Option<Config> {
    let mut v = value.clone();
    for ptr in prune {
        let segs: Vec<&str> = ptr.split('/').collect();
        let policy = match segs.as_slice() {
            ["", "plugins", name, ..] => Some(format!("/plugins/{name}")),
            ["", "routes", i, "plugins", name, ..] => Some(format!("/routes/{i}/plugins/{name}")),
            _ => None,
        };
        if let Some(p) = policy {
            if let Some(slot) = v.pointer_mut(&p) {
                *slot = json!({"enabled": false});
            }
            continue;
        }
        if let Some((parent, key)) = ptr.rsplit_once('/') {
            if let Some(Value::Object(m)) = v.pointer_mut(parent) {
                m.remove(&key.replace("~1", "/").replace("~0", "~"));
            }
        }
    }
    let Value::Object(mut top) = v else {
        return None;
    };
    let routes = top.remove("routes");
    let upstreams = top.remove("upstreams");
    top.retain(|k, val| {
        let mut one = serde_json::Map::new();
        one.insert(k.clone(), val.clone());
        serde_json::from_value::<Config>(Value::Object(one)).is_ok()
    });
    let mut cfg: Config = serde_json::from_value(Value::Object(top)).ok()?;
    if let Some(Value::Object(us)) = upstreams {
        for (name, u) in us {
            let up = serde_json::from_value(u).or_else(|_| {
                serde_json::from_value(json!({"targets": [{"url": "http://placeholder.invalid"}]}))
            });
            if let Ok(up) = up {
                cfg.upstreams.insert(name, up);
            }
        }
    }
    if let Some(Value::Array(rs)) = routes {
        let parsed: Option<Vec<crate::model::Route>> = rs
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let name = r
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                    .map_or_else(|| format!("\u{0}route-{i}"), str::to_string);
                serde_json::from_value(r)
                    .or_else(|_| {
                        serde_json::from_value(
                            json!({"name": name, "paths": ["/"], "plugins": {"echo": {}}}),
                        )
                    })
                    .ok()
            })
            .collect();
        cfg.routes = parsed.unwrap_or_default();
    }
    Some(cfg)
}

fn shorten(msg: &str) -> String {
    // jsonschema messages quote the whole instance; keep them readable.
    if msg.len() > 300 {
        format!("{}…", &msg[..msg.floor_char_boundary(300)])
    } else {
        msg.to_string()
    }
}

/// The property names of the schema object that produced an `additionalProperties` error.
fn allowed_keys(schema: &Value, schema_path: &str) -> Vec<String> {
    let obj_path = schema_path.trim_end_matches("/additionalProperties");
    let mut node = schema.pointer(obj_path);
    if let Some(r) = node.and_then(|n| n.get("$ref")).and_then(Value::as_str) {
        node = schema.pointer(r.trim_start_matches('#'));
    }
    node.and_then(|n| n.get("properties"))
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

fn semantic_check(c: &Config, catalog: &dyn PluginCatalog, diags: &mut Vec<Diagnostic>) {
    let root = KeyPath::root();
    for (i, l) in c.listen.iter().enumerate() {
        check_addr(l, root.key("listen").index(i), diags);
    }
    check_addr(&c.admin.listen, root.key("admin").key("listen"), diags);
    if let Some(tls) = &c.tls {
        let p = root.key("tls");
        for (i, l) in tls.listen.iter().enumerate() {
            check_addr(l, p.key("listen").index(i), diags);
        }
        if tls.certificates.is_empty() {
            diags.push(Diagnostic::new(
                p.key("certificates"),
                "at least one certificate is needed",
            ));
        }
        if tls.certificates.iter().filter(|c| c.default).count() > 1 {
            diags.push(Diagnostic::new(
                p.key("certificates"),
                "only one certificate can be `default: true`",
            ));
        }
    }
    if c.workers == Some(0) {
        diags.push(Diagnostic::new(
            root.key("workers"),
            "workers must be at least 1",
        ));
    }
    for (i, cidr) in c.trusted_proxies.iter().enumerate() {
        if parse_cidr(cidr).is_none() {
            diags.push(Diagnostic::new(
                root.key("trusted_proxies").index(i),
                format!("`{cidr}` is not an IP address or CIDR range"),
            ));
        }
    }
    for (name, up) in &c.upstreams {
        let p = root.key("upstreams").key(name);
        if up.targets.is_empty() {
            diags.push(Diagnostic::new(
                p.key("targets"),
                "an upstream needs at least one target",
            ));
        } else if up.targets.iter().all(|t| t.weight == 0) {
            diags.push(Diagnostic::new(
                p.key("targets"),
                "every target has weight 0; at least one must take traffic",
            ));
        }
        for (i, t) in up.targets.iter().enumerate() {
            if let Err(e) = check_target_url(&t.url) {
                diags.push(Diagnostic::new(p.key("targets").index(i).key("url"), e));
            }
        }
    }
    check_plugins(&c.plugins, &root.key("plugins"), catalog, diags);
    let mut names = HashSet::new();
    let upstream_names: Vec<&str> = c.upstreams.keys().map(String::as_str).collect();
    for (i, r) in c.routes.iter().enumerate() {
        let p = root.key("routes").index(i);
        if r.name.is_empty() {
            diags.push(Diagnostic::new(
                p.key("name"),
                "a route needs a non-empty name",
            ));
        } else if !names.insert(r.name.as_str()) {
            diags.push(Diagnostic::new(
                p.key("name"),
                format!("route name `{}` is used twice", r.name),
            ));
        }
        if r.paths.is_empty() {
            diags.push(Diagnostic::new(
                p.key("paths"),
                "a route needs at least one path",
            ));
        }
        let mut captures: Vec<String> = Vec::new();
        for (j, path) in r.paths.iter().enumerate() {
            match PathPattern::parse(path) {
                Ok(pat) => captures.extend(pat.captures()),
                Err(e) => diags.push(Diagnostic::new(p.key("paths").index(j), e)),
            }
        }
        for (j, h) in r.hosts.iter().enumerate() {
            if let Err(e) = check_host(h) {
                diags.push(Diagnostic::new(p.key("hosts").index(j), e));
            }
        }
        for (j, m) in r.methods.iter().enumerate() {
            let up = m.to_ascii_uppercase();
            if *m != up && KNOWN_METHODS.contains(&up.as_str()) {
                diags.push(Diagnostic::new(
                    p.key("methods").index(j),
                    format!("methods are upper-case: write `{up}`"),
                ));
            } else if http::Method::from_bytes(m.as_bytes()).is_err() {
                diags.push(
                    Diagnostic::new(
                        p.key("methods").index(j),
                        format!("`{m}` is not an HTTP method"),
                    )
                    .suggest(&up, KNOWN_METHODS),
                );
            } else if !KNOWN_METHODS.contains(&m.as_str()) && closest(m, KNOWN_METHODS).is_some() {
                diags.push(
                    Diagnostic::new(p.key("methods").index(j), format!("unknown method `{m}`"))
                        .suggest(m, KNOWN_METHODS),
                );
            }
        }
        for name in r.headers.keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                diags.push(Diagnostic::new(
                    p.key("headers").key(name),
                    format!("`{name}` is not a valid header name"),
                ));
            }
        }
        let has_terminator = r
            .plugins
            .iter()
            .any(|(k, v)| !is_disabled(v) && catalog.answers_itself(k))
            || c.plugins.iter().any(|(k, v)| {
                !is_disabled(v) && !r.plugins.contains_key(k) && catalog.answers_itself(k)
            });
        match &r.upstream {
            Some(u) if !c.upstreams.contains_key(u) => diags.push(
                Diagnostic::new(
                    p.key("upstream"),
                    format!("upstream `{u}` is not defined in `upstreams`"),
                )
                .suggest(u, upstream_names.iter().copied()),
            ),
            None if !has_terminator => diags.push(Diagnostic::new(
                p.clone(),
                "a route needs an `upstream` (or a policy that answers itself, like `echo`)",
            )),
            _ => {}
        }
        if let Some(rw) = &r.rewrite {
            match Template::parse_path(rw) {
                Err(e) => diags.push(Diagnostic::new(p.key("rewrite"), e)),
                Ok(t) => {
                    if !rw.starts_with('/') && !rw.starts_with("${") {
                        diags.push(Diagnostic::new(
                            p.key("rewrite"),
                            "a rewrite must produce a path starting with `/`",
                        ));
                    }
                    for v in t.vars() {
                        if let Var::Param(n) = v {
                            if !captures.contains(n) {
                                diags.push(
                                    Diagnostic::new(p.key("rewrite"), format!("`{{{n}}}` is not captured by any of this route's paths"))
                                        .suggest(n, captures.iter().map(String::as_str)),
                                );
                            }
                        }
                    }
                }
            }
        }
        check_plugins(&r.plugins, &p.key("plugins"), catalog, diags);
    }
}

fn check_plugins(
    map: &BTreeMap<String, Value>,
    path: &KeyPath,
    catalog: &dyn PluginCatalog,
    diags: &mut Vec<Diagnostic>,
) {
    for (name, settings) in map {
        if is_disabled(settings) {
            continue;
        }
        let settings = strip_enabled(settings);
        for (rel, msg) in catalog.check(name, &settings) {
            let mut p = path.key(name);
            p.append(&rel);
            diags.push(Diagnostic::new(p, msg));
        }
    }
}

/// A policy's settings without the common `enabled` key (and `null` read as `{}`).
pub fn strip_enabled(settings: &Value) -> Value {
    match settings {
        Value::Object(m) => {
            let mut m = m.clone();
            m.remove("enabled");
            Value::Object(m)
        }
        Value::Null => json!({}),
        other => other.clone(),
    }
}

/// Whether policy settings say `enabled: false`.
pub fn is_disabled(settings: &Value) -> bool {
    settings.get("enabled").and_then(Value::as_bool) == Some(false)
}

fn check_addr(s: &str, path: KeyPath, diags: &mut Vec<Diagnostic>) {
    if s.parse::<std::net::SocketAddr>().is_err() {
        diags.push(Diagnostic::new(
            path,
            format!("`{s}` is not an address; write IP:PORT, e.g. `127.0.0.1:8080` or `[::]:8080`"),
        ));
    }
}

/// Parse a CIDR, or a bare address as a single-host range.
pub fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

fn check_host(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.is_empty() || name.contains('*') {
        return Err(format!(
            "`{h}`: a wildcard is only allowed as a leading `*.` label"
        ));
    }
    if name.contains(':') && !name.starts_with('[') {
        return Err(format!(
            "`{h}`: hosts are matched without a port; remove `:PORT`"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'))
    {
        return Err(format!("`{h}` is not a valid host name"));
    }
    Ok(())
}

/// Check a target URL: `http(s)://host[:port]` with no path beyond `/`.
pub fn check_target_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "`{url}`: a target URL starts with `http://` or `https://`"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty())
    {
        return Err(format!(
            "`{url}`: a target URL has no path; use `rewrite` on the route to change paths"
        ));
    }
    Ok(uri)
}

/// Closest valid name among `candidates`, for hints.
pub fn did_you_mean<'a>(
    got: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    closest(got, candidates)
}
