//! Helpers shared by the test files that make gRPC calls the client library does not.

#![allow(dead_code)]

/// Sends `body` as a raw gRPC message (bypassing protobuf encoding) and returns the status code.
pub async fn raw_grpc_call(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: &[u8],
) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("{path}: no connection: {e}");
    }
    let codec = RawCodec;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    match grpc.unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(body.to_vec()), path, codec).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Starts a call on `path` that sends `body` as its one message, then keeps its request stream
/// open until the returned sender is dropped: the server has received the message, and holds it
/// until the stream ends. The task returns the call's status code.
pub fn open_call(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> (tokio::sync::mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<tonic::Code>) {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender.try_send(body).expect("an empty channel");
    let call = tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Err(e) = grpc.ready().await {
            panic!("{path}: no connection: {e}");
        }
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        match grpc
            .client_streaming::<_, Vec<u8>, Vec<u8>, _>(tonic::Request::new(stream), path, RawCodec)
            .await
        {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    });
    (sender, call)
}
