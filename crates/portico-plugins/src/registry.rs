//! The catalogue of policies: name, priority, settings schema, constructor; and how a
//! route's chain is assembled from global and route entries.

use std::collections::BTreeMap;
use std::sync::Arc;

use portico_config::load::{is_disabled, strip_enabled};
use portico_config::{KeyPath, PluginCatalog};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::plugins;
use crate::policy::Policy;

/// Problems in a policy's settings, with key paths relative to the settings.
pub type SettingsErrors = Vec<(KeyPath, String)>;

/// One kind of policy.
pub struct PluginDef {
    pub name: &'static str,
    /// Position in the chain: request phases run high to low, response phases low to high.
    pub priority: i32,
    /// The stage of the baseline order this policy belongs to (for docs and the admin API).
    pub stage: &'static str,
    /// The policy answers requests itself (its route needs no upstream).
    pub terminal: bool,
    pub schema: fn(&mut SchemaGenerator) -> Schema,
    pub build: BuildFn,
}

/// Builds a policy from its settings.
pub type BuildFn = fn(&Value, &BuildEnv) -> Result<Arc<dyn Policy>, SettingsErrors>;

/// The services a policy may keep when it is built (so nothing is looked up by name
/// per request). Validation builds policies with [`BuildEnv::default`], which has
/// the same shape but is attached to nothing.
#[derive(Clone)]
pub struct BuildEnv {
    /// Consumers and credentials (kept current without a reload).
    pub identity: Arc<portico_store::Identity>,
    /// The configuration file's directory, which relative file paths in settings (an
    /// `openapi` spec) resolve against. `None`: the current directory.
    pub config_dir: Option<std::path::PathBuf>,
    /// State that outlives snapshots (rate-limit counters, in-flight counts), owned by
    /// the gateway: a policy rebuilt with the same settings in the same scope finds
    /// its state again.
    pub state: Arc<crate::state::PolicyState>,
    /// Where the policy is being built: `global`, or `route:NAME` (see
    /// [`BuildEnv::for_route`]). Part of the names policies keep their state under.
    pub scope: Arc<str>,
}

impl Default for BuildEnv {
    fn default() -> Self {
        BuildEnv {
            identity: Arc::new(portico_store::Identity::detached()),
            config_dir: None,
            state: Arc::default(),
            scope: Arc::from("global"),
        }
    }
}

impl BuildEnv {
    /// The same services, for the policies of one route.
    pub fn for_route(&self, route: &str) -> BuildEnv {
        BuildEnv {
            scope: Arc::from(format!("route:{route}")),
            ..self.clone()
        }
    }
}

/// Priorities of authentication policies (between request hygiene and authorization).
pub const AUTH_PRIORITY: std::ops::Range<i32> = 2000..3000;

/// Priorities of rate limits and quotas (after authorization, before request
/// validation): they can count per consumer, and refuse before a body is read.
pub const LIMIT_PRIORITY: std::ops::Range<i32> = 1100..1900;

/// Priorities of the cache lookup (after request validation, so only valid requests
/// are answered from the cache; before request transforms, so keys are computed on
/// the request as the client sent it).
pub const CACHE_PRIORITY: std::ops::Range<i32> = 850..1000;

/// Policies at or above this priority are request hygiene: they also run when the
/// route's path matched but its method did not (so CORS preflights are not 405).
pub const HYGIENE_PRIORITY: i32 = 3000;

/// Every policy Portico knows, by descending priority.
pub fn all() -> &'static [PluginDef] {
    plugins::DEFS
}

pub fn find(name: &str) -> Option<&'static PluginDef> {
    all().iter().find(|d| d.name == name)
}

/// Schema of a settings type.
pub fn schema_of<T: JsonSchema>(gen: &mut SchemaGenerator) -> Schema {
    T::json_schema(gen)
}

/// Parse settings into their typed form, with the path of the first problem.
pub fn parse<T: DeserializeOwned>(v: &Value) -> Result<T, SettingsErrors> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let p = e.path().to_string();
        let path = if p == "." {
            KeyPath::root()
        } else {
            KeyPath::parse(&p)
        };
        vec![(path, e.inner().to_string())]
    })
}

/// The catalogue as the configuration layer sees it.
pub struct Catalog;

impl PluginCatalog for Catalog {
    fn names(&self) -> Vec<&'static str> {
        all().iter().map(|d| d.name).collect()
    }
    fn schema(&self, name: &str, gen: &mut SchemaGenerator) -> Option<Schema> {
        find(name).map(|d| (d.schema)(gen))
    }
    fn check(&self, name: &str, settings: &Value) -> Vec<(KeyPath, String)> {
        check_with(name, settings, &BuildEnv::default())
    }
    fn check_in(
        &self,
        name: &str,
        settings: &Value,
        base_dir: &std::path::Path,
    ) -> Vec<(KeyPath, String)> {
        let env = BuildEnv {
            config_dir: Some(base_dir.to_path_buf()),
            ..BuildEnv::default()
        };
        check_with(name, settings, &env)
    }
    fn answers_itself(&self, name: &str) -> bool {
        find(name).is_some_and(|d| d.terminal)
    }
}

fn check_with(name: &str, settings: &Value, env: &BuildEnv) -> Vec<(KeyPath, String)> {
    match find(name) {
        Some(d) => (d.build)(settings, env).err().unwrap_or_default(),
        None => vec![(KeyPath::root(), format!("unknown policy `{name}`"))],
    }
}

/// One policy in a route's chain.
#[derive(Clone)]
pub struct ChainEntry {
    pub name: &'static str,
    pub priority: i32,
    pub stage: &'static str,
    /// `global` or `route`.
    pub source: &'static str,
    pub policy: Arc<dyn Policy>,
}

/// Build the global policies once; routes share these instances.
pub fn build_global(
    global: &BTreeMap<String, Value>,
    env: &BuildEnv,
) -> Result<BTreeMap<String, ChainEntry>, (String, SettingsErrors)> {
    let mut out = BTreeMap::new();
    for (name, settings) in global {
        if is_disabled(settings) {
            continue;
        }
        out.insert(name.clone(), build_one(name, settings, "global", env)?);
    }
    Ok(out)
}

fn build_one(
    name: &str,
    settings: &Value,
    source: &'static str,
    env: &BuildEnv,
) -> Result<ChainEntry, (String, SettingsErrors)> {
    let def = find(name).ok_or_else(|| {
        (
            name.to_string(),
            vec![(KeyPath::root(), format!("unknown policy `{name}`"))],
        )
    })?;
    let policy = (def.build)(&strip_enabled(settings), env).map_err(|e| (name.to_string(), e))?;
    Ok(ChainEntry {
        name: def.name,
        priority: def.priority,
        stage: def.stage,
        source,
        policy,
    })
}

/// A route's chain: global entries, replaced or removed by the route's own entries,
/// ordered by priority (never by the order of keys in the file).
pub fn build_chain(
    global: &BTreeMap<String, ChainEntry>,
    route: &BTreeMap<String, Value>,
    env: &BuildEnv,
) -> Result<Vec<ChainEntry>, (String, SettingsErrors)> {
    let mut chain: BTreeMap<&str, ChainEntry> = BTreeMap::new();
    for (name, e) in global {
        if !route.contains_key(name) {
            chain.insert(name.as_str(), e.clone());
        }
    }
    for (name, settings) in route {
        if is_disabled(settings) {
            continue;
        }
        chain.insert(name.as_str(), build_one(name, settings, "route", env)?);
    }
    let mut v: Vec<ChainEntry> = chain.into_values().collect();
    v.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(b.name)));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate after a route's authentication policies sits after the last policy
    /// with `auth()`: every policy in the authentication band must be one, and none
    /// outside it, or a policy would run on the wrong side of the gate.
    #[test]
    fn authentication_policies_and_only_they_sit_in_the_band() {
        let env = BuildEnv::default();
        let samples: &[(&str, serde_json::Value)] = &[
            ("key-auth", serde_json::json!({})),
            ("basic-auth", serde_json::json!({})),
            ("mtls", serde_json::json!({})),
            ("acl", serde_json::json!({"allow": ["a"]})),
            (
                "claims",
                serde_json::json!({"rules": [{"claim": "a", "present": true}]}),
            ),
            (
                "jwt",
                serde_json::json!({"secret": "0123456789abcdef0123456789abcdef"}),
            ),
            (
                "oauth2-introspection",
                serde_json::json!({"endpoint": "http://127.0.0.1:1/i", "client_id": "a", "client_secret": "b"}),
            ),
            ("hmac-auth", serde_json::json!({})),
            (
                "ip-restriction",
                serde_json::json!({"allow": ["10.0.0.0/8"]}),
            ),
            ("echo", serde_json::json!({})),
        ];
        for def in all() {
            let in_band = AUTH_PRIORITY.contains(&def.priority);
            if let Some((_, settings)) = samples.iter().find(|(n, _)| *n == def.name) {
                let built = (def.build)(settings, &env);
                let policy = match built {
                    Ok(p) => p,
                    Err(e) => panic!("{}: {e:?}", def.name),
                };
                assert_eq!(policy.auth().is_some(), in_band, "{}", def.name);
            } else {
                assert!(
                    !in_band || def.stage == "authentication",
                    "{} is in the authentication band",
                    def.name
                );
            }
        }
        // The limits sit in their band, and only they.
        for def in all() {
            assert_eq!(
                LIMIT_PRIORITY.contains(&def.priority),
                def.stage == "rate limits and quotas",
                "{}",
                def.name
            );
        }
        // The cache lookup sits in its band, and only it.
        for def in all() {
            assert_eq!(
                CACHE_PRIORITY.contains(&def.priority),
                def.stage == "cache lookup",
                "{}",
                def.name
            );
        }
        // Transforms: `json-xml` nearest the upstream both ways, `data-masking` the
        // last response transform, all after validation and before the proxy.
        let p = |n: &str| find(n).map(|d| d.priority).unwrap_or_default();
        assert!(p("request-validation") > p("request-transformer"));
        assert!(p("request-transformer") > p("json-xml"));
        assert!(p("json-xml") < p("response-transformer"));
        assert!(p("response-transformer") < p("data-masking"));
        assert!(p("json-xml") > p("mock"));
        assert!(find("mock").is_some_and(|d| d.terminal));
        // DEFS is listed by descending priority.
        assert!(all().windows(2).all(|w| w[0].priority >= w[1].priority));
    }
}
