//! The generated protocol code in `src/generated/` must match what `ttrpc-codegen`
//! produces from `protos/agent.proto`. Run with `GPUVM_REGENERATE=1` to rewrite it.

use std::fs;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

/// Files in `src/generated/`, and which codegen run produces each of them.
const FILES: [(&str, &str); 3] = [
    ("agent.rs", "sync/agent.rs"),
    ("agent_ttrpc.rs", "sync/agent_ttrpc.rs"),
    ("agent_ttrpc_async.rs", "async/agent_ttrpc.rs"),
];

fn generate(out: &Path, asynchronous: bool) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    fs::create_dir_all(out).expect("create codegen output dir");
    Codegen::new()
        .out_dir(out)
        .include(crate_dir.join("protos"))
        .input(crate_dir.join("protos/agent.proto"))
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: asynchronous,
            ..Default::default()
        })
        .run()
        .expect("ttrpc-codegen runs");
}

#[test]
fn generated_code_is_in_sync_with_the_proto() {
    let tmp = tempfile::tempdir().expect("tempdir");
    generate(&tmp.path().join("sync"), false);
    generate(&tmp.path().join("async"), true);

    let committed_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/generated");
    let regenerate = std::env::var_os("GPUVM_REGENERATE").is_some();
    let mut stale = Vec::new();
    for (committed, generated) in FILES {
        let fresh = fs::read_to_string(tmp.path().join(generated)).expect("read generated file");
        let path = committed_dir.join(committed);
        if regenerate {
            fs::create_dir_all(&committed_dir).expect("create src/generated");
            fs::write(&path, &fresh).expect("write generated file");
        } else if fs::read_to_string(&path).ok().as_deref() != Some(fresh.as_str()) {
            stale.push(committed);
        }
    }
    assert!(
        stale.is_empty(),
        "generated protocol code is stale: {stale:?}; run \
         `GPUVM_REGENERATE=1 cargo test -p gpuvm-protocol --test codegen_in_sync`"
    );
}
