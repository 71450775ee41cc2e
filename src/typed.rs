//! Typed protobuf RPC: requests and responses as prost messages instead of bytes.
//!
//! Generated service code (`clustergo-build`) is a thin layer over these; they are usable by
//! hand as well.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::addr::LogicAddr;
use crate::error::{ErrorCode, HandlerError, RpcError};
use crate::node::{Node, NodeBuilder};
use crate::rpc::CallContext;

fn decode_reply<Resp: Message + Default>(
    to: LogicAddr,
    method: &str,
    reply: Result<Bytes, RpcError>,
) -> Result<Resp, RpcError> {
    Resp::decode(reply?).map_err(|e| RpcError::BadResponse {
        to,
        method: method.into(),
        reason: e.to_string(),
    })
}

impl Node {
    /// Calls `method` on `to` with a protobuf request and decodes the protobuf response;
    /// `timeout` defaults to [`NodeConfig::call_timeout`](crate::NodeConfig::call_timeout).
    pub async fn call_proto<Req, Resp>(
        &self,
        to: LogicAddr,
        method: &str,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, RpcError>
    where
        Req: Message,
        Resp: Message + Default,
    {
        let payload = Bytes::from(request.encode_to_vec());
        let timeout = timeout.unwrap_or(self.inner_config().call_timeout);
        decode_reply(
            to,
            method,
            self.call_timeout(to, method, payload, timeout).await,
        )
    }

    /// [`Node::call_with_callback`] with protobuf request and response.
    pub fn call_proto_with_callback<Req, Resp, F>(
        &self,
        to: LogicAddr,
        method: &str,
        request: &Req,
        timeout: Duration,
        callback: F,
    ) where
        Req: Message,
        Resp: Message + Default,
        F: FnOnce(Result<Resp, RpcError>) + Send + 'static,
    {
        let payload = Bytes::from(request.encode_to_vec());
        let name = method.to_owned();
        self.call_with_callback(to, method, payload, timeout, move |reply| {
            callback(decode_reply(to, &name, reply))
        });
    }

    /// [`Node::post`] with a protobuf request.
    pub async fn post_proto<Req: Message>(
        &self,
        to: LogicAddr,
        method: &str,
        request: &Req,
    ) -> Result<(), RpcError> {
        self.post(to, method, Bytes::from(request.encode_to_vec()))
            .await
    }
}

impl NodeBuilder {
    /// Registers an async RPC handler that takes and returns protobuf messages. A request that
    /// does not decode as `Req` is answered with [`ErrorCode::BAD_REQUEST`].
    pub fn rpc_proto<Req, Resp, F, Fut>(self, method: &str, handler: F) -> Self
    where
        Req: Message + Default + 'static,
        Resp: Message + 'static,
        F: Fn(CallContext, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
    {
        self.rpc(method, move |ctx, payload| {
            let request = Req::decode(payload);
            let fut = request.map(|r| handler(ctx, r));
            async move {
                let fut = fut.map_err(|e| HandlerError {
                    code: ErrorCode::BAD_REQUEST,
                    message: format!("request did not decode: {e}"),
                })?;
                Ok(Bytes::from(fut.await?.encode_to_vec()))
            }
        })
    }
}
