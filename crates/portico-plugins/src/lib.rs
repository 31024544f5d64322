//! Portico's request pipeline contract and policies.
//!
//! Owns: the [`Policy`] trait (one default no-op method per phase), the per-request
//! [`Ctx`], the gateway error type and its JSON answer, the pipeline [`Body`], the
//! evaluation of the shared grammar (client IP, templates, keys), and the catalogue
//! of policies with their priorities.
//!
//! Does not own: listeners, routing, or talking to upstreams (`portico-proxy`).
#![forbid(unsafe_code)]

pub mod body;
pub mod clock;
pub mod ctx;
pub mod error;
pub mod plugins;
pub mod policy;
pub mod registry;
pub mod state;

pub use body::{Body, BoxError};
pub use ctx::{canonical, client_ip, Consumer, Ctx, RequestId};
pub use error::{ErrorKind, GatewayError, Side};
pub use policy::{AuthInfo, BackgroundRefresh, BodyStep, Flow, Outcome, Policy, Step};
pub use registry::{build_chain, build_global, BuildEnv, Catalog, ChainEntry, HYGIENE_PRIORITY};
pub use state::PolicyState;
