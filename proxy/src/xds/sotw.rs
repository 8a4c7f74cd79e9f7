//! State of the world: every response of a type carries all of it (for
//! endpoints and routes, all of the names subscribed), and each request
//! repeats the names and the version it holds.

use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{CLUSTER, ENDPOINT, LISTENER, ROUTE, Say, Update, XdsClient, rejection};
use crate::config::Problem;
use component::Backoff;

impl XdsClient {
    fn sotw_request(&self, type_url: &'static str, error: Option<Problem>) -> DiscoveryRequest {
        let status = self.status(type_url);
        DiscoveryRequest {
            version_info: status.version,
            node: Some(self.node.clone()),
            resource_names: status.names,
            type_url: type_url.to_string(),
            response_nonce: status.nonce,
            error_detail: error.map(rejection),
            ..Default::default()
        }
    }

    pub(super) async fn stream_sotw(
        &mut self,
        mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        for type_url in [CLUSTER, LISTENER] {
            tx.send(self.sotw_request(type_url, None))?;
        }
        for type_url in [ENDPOINT, ROUTE] {
            if !self.status(type_url).names.is_empty() {
                tx.send(self.sotw_request(type_url, None))?;
            }
        }
        let mut responses = client
            .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(pilot = %self.pilot, "xDS stream open (state of the world)");
        while let Some(response) = responses.message().await? {
            backoff.reset();
            let update = Update::Sotw(response.resources);
            for say in self.apply(
                &response.type_url,
                response.nonce,
                response.version_info,
                update,
            ) {
                tx.send(match say {
                    Say::Ack(t) | Say::Subscribe { type_url: t, .. } => self.sotw_request(t, None),
                    Say::Nack(t, problem) => self.sotw_request(t, Some(problem)),
                })?;
            }
        }
        anyhow::bail!("Pilot closed the stream")
    }
}
