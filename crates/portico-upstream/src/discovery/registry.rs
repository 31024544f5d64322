//! The gateway's own service registry: instances register with
//! `PUT /admin/registry/{service}` and renew by heartbeat; an expired registration
//! drops out. Upstreams with `discovery: {registry: {service}}` follow it.

/// Registered instances, by service.
#[derive(Debug, Default)]
pub struct Registry {}
