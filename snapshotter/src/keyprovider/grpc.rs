//! The protocol over gRPC: `keyprovider.KeyProviderService`, whose two methods carry the same
//! JSON as the command form inside one bytes field. The two messages are declared here rather
//! than generated from ocicrypt's `keyprovider.proto`: two one-field messages do not justify a
//! protoc step in the build.

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use zeroize::Zeroizing;

use super::call::Operation;
use super::MAX_ANSWER;

/// `keyProviderKeyWrapProtocolInput`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtocolInput {
    /// The JSON request.
    #[prost(bytes = "vec", tag = "1")]
    pub key_provider_key_wrap_protocol_input: Vec<u8>,
}

/// `keyProviderKeyWrapProtocolOutput`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtocolOutput {
    /// The JSON answer.
    #[prost(bytes = "vec", tag = "1")]
    pub key_provider_key_wrap_protocol_output: Vec<u8>,
}

/// Why a call failed: the provider was not reached (worth another attempt), or it answered
/// with an error.
pub(super) enum Failure {
    Unreachable(String),
    Refused(String),
}

async fn connect(address: &str, timeout: Duration) -> Result<Channel, Failure> {
    let unreachable = |e: &dyn std::fmt::Display| Failure::Unreachable(e.to_string());
    if let Some(path) = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
    {
        let path = path.to_string();
        // The URI is required by the API and unused by the connector.
        Endpoint::from_static("http://keyprovider.invalid")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(path.clone())
            }))
            .await
            .map_err(|e| unreachable(&crate::error_chain(&e)))
    } else {
        let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| {
            Failure::Refused(format!("{address:?} is not HOST:PORT or unix:///PATH: {e}"))
        })?;
        endpoint
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| unreachable(&crate::error_chain(&e)))
    }
}

pub(super) async fn call(
    address: &str,
    operation: Operation,
    request: &[u8],
    timeout: Duration,
) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let channel = connect(address, timeout).await?;
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_ANSWER);
    client
        .ready()
        .await
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let method = match operation {
        Operation::Wrap => "/keyprovider.KeyProviderService/WrapKey",
        Operation::Unwrap => "/keyprovider.KeyProviderService/UnWrapKey",
    };
    let input = ProtocolInput {
        key_provider_key_wrap_protocol_input: request.to_vec(),
    };
    let answer: Result<tonic::Response<ProtocolOutput>, tonic::Status> = client
        .unary(
            tonic::Request::new(input),
            PathAndQuery::from_static(method),
            tonic::codec::ProstCodec::default(),
        )
        .await;
    match answer {
        Ok(answer) => Ok(Zeroizing::new(
            answer.into_inner().key_provider_key_wrap_protocol_output,
        )),
        Err(status) if status.code() == tonic::Code::Unavailable => {
            Err(Failure::Unreachable(status.message().to_string()))
        }
        Err(status) => Err(Failure::Refused(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}
