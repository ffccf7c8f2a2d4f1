//! A real gRPC service and client for the L7 tests: tonic's server and client machinery
//! (no code generation: the messages are prost structs and the methods are routed by
//! path, which is what generated code does), over HTTP/2 prior knowledge.
//!
//! Methods of `test.Echo`: `Say` (unary: `"<name> says <text>"`), `Secret` (unary, for
//! policy tests), `Chat` (bidirectional streaming: each message echoed upper-cased).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The one message of `test.Echo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[derive(Clone)]
struct Say(String);

impl tower_service::Service<Request<Msg>> for Say {
    type Response = Response<Msg>;
    type Error = Status;
    type Future = BoxFuture<Result<Response<Msg>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        let text = format!("{} says {}", self.0, req.into_inner().text);
        Box::pin(async move { Ok(Response::new(Msg { text })) })
    }
}

#[derive(Clone)]
struct Chat;

impl tower_service::Service<Request<Streaming<Msg>>> for Chat {
    type Response = Response<MsgStream>;
    type Error = Status;
    type Future = BoxFuture<Result<Response<MsgStream>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Streaming<Msg>>) -> Self::Future {
        let s = req.into_inner().map(|m| {
            m.map(|m| Msg {
                text: m.text.to_uppercase(),
            })
        });
        Box::pin(async move { Ok(Response::new(Box::pin(s) as MsgStream)) })
    }
}

/// Starts the service `name` on a free loopback port (its own thread and runtime).
pub fn serve(name: &str) -> std::io::Result<SocketAddr> {
    serve_on("127.0.0.1:0", name)
}

/// Starts the service `name` on `bind` (call inside a namespace to serve that host).
pub fn serve_on(bind: &str, name: &str) -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind(bind)?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?;
    let name = name.to_string();
    crate::http::serve_in_thread(l, move |tcp| {
        let name = name.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| {
                let name = name.clone();
                async move {
                    let codec = || ProstCodec::<Msg, Msg>::default();
                    let resp = match req.uri().path() {
                        "/test.Echo/Say" | "/test.Echo/Secret" => {
                            tonic::server::Grpc::new(codec())
                                .unary(Say(name), req)
                                .await
                        }
                        "/test.Echo/Chat" => {
                            tonic::server::Grpc::new(codec()).streaming(Chat, req).await
                        }
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    });
    Ok(addr)
}

type Channel = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

/// A gRPC client of `test.Echo` at `addr` (HTTP/2 prior knowledge).
#[derive(Debug)]
pub struct Client {
    rt: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<Channel>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel: Channel = {
            let _enter = rt.enter();
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http()
        };
        let origin: hyper::Uri = format!("http://{addr}").parse()?;
        Ok(Self {
            rt,
            grpc: tonic::client::Grpc::with_origin(channel, origin),
        })
    }

    /// A unary call of `method` (`Say` or `Secret`).
    pub fn unary(&mut self, method: &'static str, text: &str) -> Result<String, Status> {
        let path = match method {
            "Secret" => "/test.Echo/Secret",
            _ => "/test.Echo/Say",
        };
        let msg = Msg { text: text.into() };
        let grpc = &mut self.grpc;
        self.rt.block_on(async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                grpc.unary(
                    Request::new(msg),
                    hyper::http::uri::PathAndQuery::from_static(path),
                    ProstCodec::<Msg, Msg>::default(),
                ),
            )
            .await
            .map_err(|_| Status::deadline_exceeded("test bound"))??;
            Ok(r.into_inner().text)
        })
    }

    /// Streams `texts` to `Chat` and collects what comes back.
    pub fn chat(&mut self, texts: &[&str]) -> Result<Vec<String>, Status> {
        let out: Vec<Msg> = texts
            .iter()
            .map(|t| Msg {
                text: t.to_string(),
            })
            .collect();
        let grpc = &mut self.grpc;
        self.rt.block_on(async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let r = grpc
                .streaming(
                    Request::new(tonic::codegen::tokio_stream::iter(out)),
                    hyper::http::uri::PathAndQuery::from_static("/test.Echo/Chat"),
                    ProstCodec::<Msg, Msg>::default(),
                )
                .await?;
            let mut s = r.into_inner();
            let mut got = Vec::new();
            while let Some(m) = tokio::time::timeout(std::time::Duration::from_secs(20), s.next())
                .await
                .map_err(|_| Status::deadline_exceeded("test bound"))?
            {
                got.push(m?.text);
            }
            Ok(got)
        })
    }
}

/// A gRPC client of `test.Echo` for the caller's runtime (cloned per call: one HTTP/2
/// connection, calls multiplexed on it).
#[derive(Debug, Clone)]
pub struct AsyncClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl AsyncClient {
    pub fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let channel: Channel = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        let origin: hyper::Uri = format!("http://{addr}").parse()?;
        Ok(Self {
            grpc: tonic::client::Grpc::with_origin(channel, origin),
        })
    }

    /// A unary `Say`.
    pub async fn say(&self, text: &str) -> Result<String, Status> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let r = grpc
            .unary(
                Request::new(Msg { text: text.into() }),
                hyper::http::uri::PathAndQuery::from_static("/test.Echo/Say"),
                ProstCodec::<Msg, Msg>::default(),
            )
            .await?;
        Ok(r.into_inner().text)
    }
}
