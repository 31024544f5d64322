//! The policies, one module each. To add one: write the module (settings type with
//! `deny_unknown_fields` + `JsonSchema`, a `Policy` impl) and add a `PluginDef` below.

use std::sync::Arc;

use crate::registry::{parse, schema_of, PluginDef};

pub mod acl;
pub mod auth;
pub mod basic_auth;
pub mod cache;
pub mod claims;
pub mod compression;
pub mod concurrency_limit;
pub mod cors;
pub mod echo;
pub mod headers;
pub mod hmac_auth;
pub mod introspection;
pub mod ip_restriction;
pub mod jsonops;
pub mod key_auth;
pub mod masking;
pub mod mock;
pub mod mtls;
pub mod openapi;
pub mod quota;
pub mod rate_limit;
pub mod request_validation;
pub mod size_limit;
pub mod transform;
pub mod xml;
// `jwt` and what it uses (`fetch` is shared by policies that call identity providers).
pub mod fetch;
pub mod jwks;
pub mod jwt;
pub mod oidc;

/// Every policy, by descending priority. See docs/plugins.md for the stages.
pub static DEFS: &[PluginDef] = &[
    // Its request part only reads `Accept-Encoding`, so it comes first (every answer,
    // even an early one, can then be compressed); its response part runs last.
    PluginDef {
        name: "compression",
        priority: 3990,
        stage: "compression",
        terminal: false,
        schema: schema_of::<compression::Settings>,
        build: |v, _env| Ok(Arc::new(compression::Compression::new(parse(v)?)?)),
    },
    PluginDef {
        name: "ip-restriction",
        priority: 3950,
        stage: "request hygiene",
        terminal: false,
        schema: schema_of::<ip_restriction::Settings>,
        build: |v, _env| Ok(Arc::new(ip_restriction::IpRestriction::new(parse(v)?)?)),
    },
    PluginDef {
        name: "request-size-limit",
        priority: 3900,
        stage: "request hygiene",
        terminal: false,
        schema: schema_of::<size_limit::Settings>,
        build: |v, _env| Ok(Arc::new(size_limit::SizeLimit::new(parse(v)?))),
    },
    PluginDef {
        name: "cors",
        priority: 3800,
        stage: "request hygiene",
        terminal: false,
        schema: schema_of::<cors::Settings>,
        build: |v, _env| Ok(Arc::new(cors::Cors::new(parse(v)?)?)),
    },
    PluginDef {
        name: "oidc",
        priority: 2700,
        stage: "authentication",
        terminal: false,
        schema: schema_of::<oidc::Settings>,
        build: |v, env| Ok(Arc::new(oidc::Oidc::new(parse(v)?, env.identity.clone())?)),
    },
    PluginDef {
        name: "mtls",
        priority: 2600,
        stage: "authentication",
        terminal: false,
        schema: schema_of::<mtls::Settings>,
        build: |v, env| Ok(Arc::new(mtls::Mtls::new(parse(v)?, env.identity.clone())?)),
    },
    PluginDef {
        name: "jwt",
        priority: 2500,
        stage: "authentication",
        terminal: false,
        schema: schema_of::<jwt::Settings>,
        build: |v, env| Ok(Arc::new(jwt::Jwt::new(parse(v)?, env.identity.clone())?)),
    },
    PluginDef {
        name: "oauth2-introspection",
        priority: 2450,
        stage: "authentication",
        terminal: false,
        schema: schema_of::<introspection::Settings>,
        build: |v, env| {
            Ok(Arc::new(introspection::Introspection::new(
                parse(v)?,
                env.identity.clone(),
            )?))
        },
    },
    PluginDef {
        name: "key-auth",
        priority: 2400,
        stage: "authentication",
        terminal: false,
        schema: schema_of::<key_auth::Settings>,
        build: |v, env| {
            Ok(Arc::new(key_auth::KeyAuth::new(
                parse(v)?,
                env.identity.clone(),
            )?))
        },
    },
    PluginDef {
        name: "basic-auth",
        priority: 2300,
        stage: "authentication",
        terminal: false,
        schema: schema_of::<basic_auth::Settings>,
        build: |v, env| {
            Ok(Arc::new(basic_auth::BasicAuth::new(
                parse(v)?,
                env.identity.clone(),
            )?))
        },
    },
    PluginDef {
        name: "hmac-auth",
        priority: 2200,
        stage: "authentication",
        terminal: false,
        schema: schema_of::<hmac_auth::Settings>,
        build: |v, env| {
            Ok(Arc::new(hmac_auth::HmacAuth::new(
                parse(v)?,
                env.identity.clone(),
            )?))
        },
    },
    PluginDef {
        name: "acl",
        priority: 1950,
        stage: "authorization",
        terminal: false,
        schema: schema_of::<acl::Settings>,
        build: |v, _env| Ok(Arc::new(acl::Acl::new(parse(v)?)?)),
    },
    PluginDef {
        name: "claims",
        priority: 1940,
        stage: "authorization",
        terminal: false,
        schema: schema_of::<claims::Settings>,
        build: |v, _env| Ok(Arc::new(claims::Claims::new(parse(v)?)?)),
    },
    PluginDef {
        name: "rate-limit",
        priority: 1500,
        stage: "rate limits and quotas",
        terminal: false,
        schema: schema_of::<rate_limit::Settings>,
        build: |v, env| Ok(Arc::new(rate_limit::RateLimit::new(parse(v)?, env)?)),
    },
    // After `rate-limit`: a request it refuses does not use quota.
    PluginDef {
        name: "quota",
        priority: 1450,
        stage: "rate limits and quotas",
        terminal: false,
        schema: schema_of::<quota::Settings>,
        build: |v, env| Ok(Arc::new(quota::Quota::new(parse(v)?, env)?)),
    },
    PluginDef {
        name: "concurrency-limit",
        priority: 1400,
        stage: "rate limits and quotas",
        terminal: false,
        schema: schema_of::<concurrency_limit::Settings>,
        build: |v, env| {
            Ok(Arc::new(concurrency_limit::ConcurrencyLimit::new(
                parse(v)?,
                env,
            )?))
        },
    },
    PluginDef {
        name: "openapi",
        priority: 1010,
        stage: "request validation",
        terminal: false,
        schema: schema_of::<openapi::Settings>,
        build: |v, env| {
            Ok(Arc::new(openapi::OpenApi::new(
                parse(v)?,
                env.config_dir.as_deref(),
            )?))
        },
    },
    PluginDef {
        name: "request-validation",
        priority: 1000,
        stage: "request validation",
        terminal: false,
        schema: schema_of::<request_validation::Settings>,
        build: |v, _env| {
            Ok(Arc::new(request_validation::RequestValidation::new(
                parse(v)?,
            )?))
        },
    },
    PluginDef {
        name: "cache",
        priority: 900,
        stage: "cache lookup",
        terminal: false,
        schema: schema_of::<cache::Settings>,
        build: |v, env| Ok(Arc::new(cache::Cache::new(parse(v)?, env)?)),
    },
    PluginDef {
        name: "request-transformer",
        priority: 800,
        stage: "request transforms",
        terminal: false,
        schema: schema_of::<transform::RequestSettings>,
        build: |v, _env| Ok(Arc::new(transform::RequestTransformer::new(parse(v)?)?)),
    },
    PluginDef {
        name: "data-masking",
        priority: 795,
        stage: "response transforms",
        terminal: false,
        schema: schema_of::<masking::Settings>,
        build: |v, _env| Ok(Arc::new(masking::DataMasking::new(parse(v)?)?)),
    },
    PluginDef {
        name: "response-transformer",
        priority: 790,
        stage: "response transforms",
        terminal: false,
        schema: schema_of::<transform::ResponseSettings>,
        build: |v, _env| Ok(Arc::new(transform::ResponseTransformer::new(parse(v)?)?)),
    },
    PluginDef {
        name: "json-xml",
        priority: 780,
        stage: "request and response transforms (nearest the upstream)",
        terminal: false,
        schema: schema_of::<xml::Settings>,
        build: |v, _env| Ok(Arc::new(xml::JsonXml::new(parse(v)?)?)),
    },
    PluginDef {
        name: "mock",
        priority: 110,
        stage: "proxy (answers itself)",
        terminal: true,
        schema: schema_of::<mock::Settings>,
        build: |v, _env| Ok(Arc::new(mock::Mock::new(parse(v)?)?)),
    },
    PluginDef {
        name: "echo",
        priority: 100,
        stage: "proxy (answers itself)",
        terminal: true,
        schema: schema_of::<echo::Settings>,
        build: |v, _env| Ok(Arc::new(echo::Echo::new(parse(v)?)?)),
    },
];
