//! The gateway: the client-facing API, forwarded to a logic instance
//! through a channel balanced over the instances discovery knows. A send
//! that could not reach its instance is tried on another: sends are
//! idempotent by client message id, so a retry never sends twice.

use im_infra::registry::grpc::BalancedChannel;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::logic::USER_HEADER;
use crate::proto::gateway_server;
use crate::proto::logic_client::LogicClient;
use crate::proto::{HistoryReply, HistoryRequest, SendReply, SendRequest};
use crate::settings::ChatSettings;
use crate::status::retryable;

/// The `Gateway` gRPC service.
#[derive(Clone)]
pub struct GatewayService {
    logic: LogicClient<BalancedChannel>,
    settings: ChatSettings,
}

impl GatewayService {
    /// The gateway over `channel` (balanced over the logic instances).
    pub fn new(channel: BalancedChannel, settings: ChatSettings) -> GatewayService {
        GatewayService {
            logic: LogicClient::new(channel),
            settings,
        }
    }

    /// The generated server around it.
    pub fn into_server(self) -> gateway_server::GatewayServer<GatewayService> {
        gateway_server::GatewayServer::new(self)
    }

    fn request<T>(&self, message: T, user: Option<&str>) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        request.set_timeout(self.settings.call_timeout);
        if let Some(user) = user {
            let value = MetadataValue::try_from(user)
                .map_err(|_| Status::invalid_argument("user is not a valid header value"))?;
            request.metadata_mut().insert(USER_HEADER, value);
        }
        Ok(request)
    }
}

#[tonic::async_trait]
impl gateway_server::Gateway for GatewayService {
    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendReply>, Status> {
        let message = request.into_inner();
        let mut attempt = 1;
        loop {
            let call = self.request(message.clone(), Some(&message.user))?;
            let mut logic = self.logic.clone();
            match logic.send(call).await {
                Ok(reply) => return Ok(Response::new(reply.into_inner())),
                Err(status) if retryable(&status) && attempt < self.settings.send_attempts => {
                    metrics::counter!("chat_gateway_retries_total").increment(1);
                    tracing::debug!(%status, attempt, "a send failed on its instance; trying another");
                    attempt += 1;
                }
                Err(status) => return Err(status),
            }
        }
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryReply>, Status> {
        let call = self.request(request.into_inner(), None)?;
        let mut logic = self.logic.clone();
        logic
            .history(call)
            .await
            .map(|r| Response::new(r.into_inner()))
    }
}
