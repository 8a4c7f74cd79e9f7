//! Incremental (delta) xDS: the proxy subscribes and unsubscribes names,
//! says on a new stream what it holds, and each response carries only
//! what was added, changed or removed.

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{CLUSTER, LISTENER, Say, TYPES, Update, XdsClient, rejection};
use component::Backoff;

impl XdsClient {
    pub(super) async fn stream_delta(
        &mut self,
        mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        for type_url in TYPES {
            let names = self.status(type_url).names;
            let wildcard = matches!(type_url, CLUSTER | LISTENER);
            if !wildcard && names.is_empty() {
                continue;
            }
            tx.send(DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: type_url.to_string(),
                resource_names_subscribe: names,
                initial_resource_versions: self
                    .held
                    .versions
                    .get(type_url)
                    .map(|v| v.clone().into_iter().collect())
                    .unwrap_or_default(),
                ..Default::default()
            })?;
        }
        let mut responses = client
            .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(pilot = %self.pilot, "xDS stream open (delta)");
        while let Some(response) = responses.message().await? {
            backoff.reset();
            let update = Update::Delta {
                added: response
                    .resources
                    .into_iter()
                    .filter_map(|r| Some((r.name, r.version, r.resource?)))
                    .collect(),
                removed: response.removed_resources,
            };
            let nonce = response.nonce.clone();
            let says = self.apply(
                &response.type_url,
                response.nonce,
                response.system_version_info,
                update,
            );
            for say in says {
                let (type_url, error, added, removed) = match say {
                    Say::Ack(t) => (t, None, Vec::new(), Vec::new()),
                    Say::Nack(t, problem) => (t, Some(rejection(problem)), Vec::new(), Vec::new()),
                    Say::Subscribe {
                        type_url,
                        added,
                        removed,
                    } => (type_url, None, added, removed),
                };
                // Only the answer to this response carries its nonce.
                let response_nonce =
                    if type_url == response.type_url && added.is_empty() && removed.is_empty() {
                        nonce.clone()
                    } else {
                        String::new()
                    };
                tx.send(DeltaDiscoveryRequest {
                    type_url: type_url.to_string(),
                    response_nonce,
                    error_detail: error,
                    resource_names_subscribe: added,
                    resource_names_unsubscribe: removed,
                    ..Default::default()
                })?;
            }
        }
        anyhow::bail!("Pilot closed the stream")
    }
}
