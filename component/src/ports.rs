//! Default ports of every component (DESIGN.md, "Ports"). Each one is also a
//! flag; these are the values used when the flag is absent.

pub const GALLEY_MCP: u16 = 9901;
pub const GALLEY_WEBHOOK: u16 = 9443;
pub const PILOT_XDS: u16 = 15010;
pub const PILOT_XDS_MTLS: u16 = 15011;
pub const PILOT_DEBUG: u16 = 8080;
pub const CITADEL_CA: u16 = 8060;
pub const MIXER_GRPC: u16 = 9091;
pub const MIXER_PROMETHEUS: u16 = 42422;
pub const INJECTOR_WEBHOOK: u16 = 9443;
/// Admin and metrics port of every control-plane component.
pub const CONTROL_PLANE_ADMIN: u16 = 15014;
pub const PROXY_ADMIN: u16 = 15000;
pub const PROXY_OUTBOUND: u16 = 15001;
pub const PROXY_INBOUND: u16 = 15006;
pub const PROXY_HEALTH: u16 = 15020;
pub const PROXY_STATS: u16 = 15090;

/// Every default port: a port picked for a process of a mesh on free ports
/// must not be one of them, or a mesh on the defaults beside it could not
/// start (42422 is inside Linux's range of ports the OS hands out).
pub const DEFAULTS: [u16; 15] = [
    GALLEY_MCP,
    GALLEY_WEBHOOK,
    PILOT_XDS,
    PILOT_XDS_MTLS,
    PILOT_DEBUG,
    CITADEL_CA,
    MIXER_GRPC,
    MIXER_PROMETHEUS,
    INJECTOR_WEBHOOK,
    CONTROL_PLANE_ADMIN,
    PROXY_ADMIN,
    PROXY_OUTBOUND,
    PROXY_INBOUND,
    PROXY_HEALTH,
    PROXY_STATS,
];
