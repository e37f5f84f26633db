//! The messages, clients and servers generated from `proto/chat.proto`
//! (package `chat.v1`): [`gateway_server`]/[`gateway_client`] for the
//! client-facing API, [`logic_server`]/[`logic_client`] behind it.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("chat.v1");
