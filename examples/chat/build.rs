//! Generates the chat services' messages, clients and servers from
//! `proto/chat.proto` (protoc, installed by `scripts/services.sh install`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/chat.proto");
    tonic_prost_build::configure().compile_protos(&["proto/chat.proto"], &["proto"])?;
    Ok(())
}
