//! The generator: rustfmt-clean, documented output; failures name the file and the item.

use std::path::PathBuf;

use clustergo_build::{Builder, Error};

/// Writes `files` into a fresh directory and generates code for the first one.
fn generate(files: &[(&str, &str)]) -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!(
        "cg-build-{}-{}",
        std::process::id(),
        files[0].0.replace(['/', '.'], "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let first: PathBuf = dir.join(files[0].0);
    let r = Builder::new()
        .out_dir(dir.join("out"))
        .emit_rerun_if_changed(false)
        .compile(&[first], std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).ok();
    r
}

#[test]
fn a_valid_file_generates() {
    generate(&[(
        "ok.proto",
        "syntax = \"proto3\"; package ok; service S { rpc M(A) returns (A); } message A {}",
    )])
    .unwrap();
}

#[test]
fn malformed_proto_names_the_file_and_the_problem() {
    let e = generate(&[(
        "broken.proto",
        "syntax = \"proto3\"; message A { int32 x = ; }",
    )])
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Protoc { .. }), "{text}");
    assert!(text.contains("broken.proto"), "{text}");
    assert!(text.contains("Expected field number"), "{text}");
}

#[test]
fn streaming_methods_are_rejected() {
    let e = generate(&[(
        "chat.proto",
        "syntax = \"proto3\"; package chat; message L {} \
         service Chat { rpc Send(L) returns (L); rpc Listen(L) returns (stream L); }",
    )])
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(
            "chat.proto: service Chat, method Listen: streaming methods are not supported"
        ),
        "{text}"
    );
    let e = generate(&[(
        "up.proto",
        "syntax = \"proto3\"; message L {} service Up { rpc Push(stream L) returns (L); }",
    )])
    .unwrap_err();
    assert!(e.to_string().contains("service Up, method Push"), "{e}");
}

#[test]
fn name_collisions_are_rejected() {
    let e = generate(&[(
        "clash.proto",
        "syntax = \"proto3\"; package clash; message EchoClient {} \
         service Echo { rpc Call(EchoClient) returns (EchoClient); }",
    )])
    .unwrap_err();
    assert!(matches!(e, Error::Collision { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("clash.proto: service Echo (its generated `EchoClient`) collides with message EchoClient"),
        "{e}"
    );
    let e = generate(&[(
        "methods.proto",
        "syntax = \"proto3\"; package m; message A {} \
         service S { rpc Say(A) returns (A); rpc SayTimeout(A) returns (A); }",
    )])
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "method SayTimeout (its generated `say_timeout`) collides with service S, method Say"
        ),
        "{e}"
    );
}

#[test]
fn a_missing_import_names_it() {
    let e = generate(&[(
        "shop.proto",
        "syntax = \"proto3\"; import \"money.proto\"; \
         service Shop { rpc Buy(Money) returns (Money); }",
    )])
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Protoc { .. }), "{text}");
    assert!(text.contains("money.proto"), "{text}");
    assert!(text.contains("shop.proto"), "{text}");
}

#[test]
fn generated_code_is_rustfmt_clean_and_documented() {
    let dir = std::env::temp_dir().join(format!("cg-build-fmt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).unwrap();
    std::fs::write(
        dir.join("svc.proto"),
        "syntax = \"proto3\"; package fmt.v1;\n\
         // Says things.\n\
         service Talker {\n  // Says one thing.\n  rpc Say(Word) returns (Word);\n  rpc Type(Word) returns (Word);\n}\n\
         message Word { string text = 1; }\n",
    )
    .unwrap();
    Builder::new()
        .out_dir(dir.join("out"))
        .emit_rerun_if_changed(false)
        .compile(&[dir.join("svc.proto")], std::slice::from_ref(&dir))
        .unwrap();
    let file = dir.join("out/fmt.v1.rs");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("/// Says one thing."), "{text}");
    assert!(text.contains("/// Says things."), "{text}");
    // A keyword method keeps a usable name.
    assert!(
        text.contains("fn type_(") && text.contains("fn post_type("),
        "{text}"
    );
    let rustfmt = std::env::var_os("RUSTFMT").unwrap_or_else(|| "rustfmt".into());
    let status = std::process::Command::new(rustfmt)
        .args(["--check", "--edition", "2024"])
        .arg(&file)
        .status()
        .expect("rustfmt is part of the Rust toolchain (rustup component add rustfmt)");
    assert!(
        status.success(),
        "generated code is not rustfmt-clean:\n{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
