//! Loading: YAML → schema check (every structural problem at once) → typed model →
//! semantic checks (cross references, patterns, addresses). Every problem is reported
//! with its file, line, column and key path.

use std::path::{Path, PathBuf};

use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde_json::{json, Value};

use crate::diag::{Diagnostic, Diagnostics, KeyPath};
use crate::model::Config;
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
    /// [`PluginCatalog::check`] for a configuration whose relative file paths resolve
    /// against `base_dir` (the configuration file's directory). Default: `check`.
    fn check_in(&self, name: &str, settings: &Value, base_dir: &Path) -> Vec<(KeyPath, String)> {
        let _ = base_dir;
        self.check(name, settings)
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
            semantic_check(&partial, catalog, &base_dir, &mut more);
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
    semantic_check(&config, catalog, &base_dir, &mut diags);
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

use crate::semantic::semantic_check;
/// Structural problems, and the JSON pointers of the values to drop before the
/// semantic checks look at the rest ([`partial_config`]).
pub use crate::semantic::{check_target_url, is_disabled, parse_cidr, strip_enabled};
use crate::structure::{partial_config, schema_check, under_any};
