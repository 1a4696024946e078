//! Compiles `proto/tagstore.proto` with protox (pure Rust), so the build needs no `protoc`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=tagstore.proto");
    let fds = protox::compile(["tagstore.proto"], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("tagstore_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        // prost's codec, with undecodable requests as INVALID_ARGUMENT.
        .codec_path("crate::codec::TagstoreCodec")
        // A compact watch's bitmaps are built once and shared by every
        // watcher they go to: `Bytes`, cloned without copying.
        .bytes(".tagstore.v1.ChangeGroup")
        .skip_protoc_run()
        .compile_fds(fds)?;
    Ok(())
}
