//! The sidecar proxy: xDS client, listeners, routing, load balancing,
//! mTLS and the Mixer client. Not built yet (issue 7): the binary serves
//! only its admin port.
