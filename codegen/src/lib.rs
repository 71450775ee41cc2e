//! Generates typed clustergo services from `.proto` files, from a crate's `build.rs`.
//!
//! ```no_run
//! // build.rs
//! fn main() -> Result<(), clustergo_build::Error> {
//!     clustergo_build::compile(&["proto/echo.proto"], &["proto"])
//! }
//! ```
//!
//! For each proto `service` (say `Echo` in package `demo.v1`, method `Call`), next to the prost
//! message types, the package's file gets:
//! - `trait EchoServer`: one `fn call(&self, ctx: CallContext, request: Req) -> impl Future<Output =
//!   Result<Resp, HandlerError>> + Send` per method (implement it with `async fn`);
//! - `fn register_echo(builder: NodeBuilder, server: impl EchoServer) -> NodeBuilder`;
//! - `struct EchoClient` (`EchoClient::new(&node, addr)`) with, per method, `call(&req)`,
//!   `call_timeout(&req, timeout)`, `call_with_callback(&req, timeout, callback)` and
//!   `post_call(&req)` (one-way).
//!
//! Wire names are `package.Service/Method` (`demo.v1.Echo/Call`), so two services with a method
//! of the same name never clash. Every message gets a `prost::Name` implementation, so any
//! message can be sent one-way with `Node::send_message` and handled with
//! `NodeBuilder::on_message` without touching bytes.
//!
//! The seed's convention is accepted too: a file with top-level messages `request` and
//! `response` (either case) and no `service` is treated as `service <File> { rpc
//! Call(request) returns (response); }`, in package `<file>` when the file has none, so
//! `echo.proto` yields `EchoServer`, `register_echo` and `EchoClient::call` like any service.
//!
//! Generated files are included with `include!(concat!(env!("OUT_DIR"), "/<package>.rs"))`,
//! or all at once through the include file set with [`Builder::include_file`].
//!
//! Build-time errors name the file and the item: a streaming method (unsupported), a
//! generated name that collides with another item, a missing import or a syntax error.

mod generator;
mod validate;

use std::path::{Path, PathBuf};

/// Why generation failed. `Debug` prints the same text as `Display`, so a `build.rs` that
/// returns this error shows a readable message.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// protoc rejected the input: a syntax error, a missing import, an unknown type.
    #[error("protoc failed on {files}: {message}")]
    Protoc {
        /// The files given.
        files: String,
        /// protoc's own words.
        message: String,
    },
    /// Something in a proto that the generator does not support.
    #[error("{file}: {item}: {reason}")]
    Unsupported {
        /// The proto file.
        file: String,
        /// The service and method, e.g. `service Chat, method Listen`.
        item: String,
        /// Why.
        reason: String,
    },
    /// Two items would get the same Rust name.
    #[error("{file}: {item} collides with {other}")]
    Collision {
        /// The proto file.
        file: String,
        /// The item whose generated name collides.
        item: String,
        /// What it collides with.
        other: String,
    },
    /// Writing the generated code failed.
    #[error("writing generated code failed: {0}")]
    Io(String),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Generates code for `protos`, searching imports in `includes`, into `OUT_DIR`.
pub fn compile(protos: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> Result<(), Error> {
    Builder::new().compile(protos, includes)
}

/// Formats generated files with rustfmt when the toolchain has it (prost already laid them out
/// with prettyplease, which differs from rustfmt in places). Without rustfmt the files stay as
/// they are: formatting is a courtesy, never a reason to fail a build.
fn rustfmt(files: impl Iterator<Item = PathBuf>) {
    let files: Vec<PathBuf> = files.filter(|f| f.exists()).collect();
    if files.is_empty() {
        return;
    }
    let rustfmt = std::env::var_os("RUSTFMT").unwrap_or_else(|| "rustfmt".into());
    let _ = std::process::Command::new(rustfmt)
        .args(["--edition", "2024"])
        .args(&files)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Options of a generation run.
#[derive(Debug, Default, Clone)]
#[must_use]
pub struct Builder {
    out_dir: Option<PathBuf>,
    include_file: Option<PathBuf>,
    emit_rerun: bool,
}

impl Builder {
    /// Defaults: output into `OUT_DIR`, no include file, `cargo:rerun-if-changed` lines printed.
    pub fn new() -> Self {
        Builder {
            out_dir: None,
            include_file: None,
            emit_rerun: true,
        }
    }

    /// Writes into `dir` instead of `OUT_DIR`.
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// Also writes `name` (in the output directory): one file that includes every generated
    /// package as nested modules (`demo.v1` → `pub mod demo { pub mod v1 { … } }`), which is
    /// what cross-package references (imports) expect.
    pub fn include_file(mut self, name: impl Into<PathBuf>) -> Self {
        self.include_file = Some(name.into());
        self
    }

    /// Whether to print `cargo:rerun-if-changed` for each proto (default true; turn off when
    /// running outside a build script).
    pub fn emit_rerun_if_changed(mut self, on: bool) -> Self {
        self.emit_rerun = on;
        self
    }

    /// Generates code for `protos`, searching imports in `includes`.
    pub fn compile(
        &self,
        protos: &[impl AsRef<Path>],
        includes: &[impl AsRef<Path>],
    ) -> Result<(), Error> {
        let files = protos
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let protoc = protoc_bin_vendored::protoc_bin_path().map_err(|e| Error::Protoc {
            files: files.clone(),
            message: format!("no bundled protoc for this platform: {e}"),
        })?;
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc);
        config.bytes(["."]);
        config.enable_type_names();
        // Messages without proto comments have no docs; keep `missing_docs` quiet on them.
        config.type_attribute(".", "#[allow(missing_docs)]");
        if let Some(dir) = &self.out_dir {
            config.out_dir(dir);
        } else if std::env::var_os("OUT_DIR").is_none() {
            return Err(Error::Io(
                "OUT_DIR is not set: run from a build script or set Builder::out_dir".into(),
            ));
        }
        if let Some(name) = &self.include_file {
            config.include_file(name);
        }
        let mut fds = config
            .load_fds(protos, includes)
            .map_err(|e| Error::Protoc {
                files: files.clone(),
                message: e.to_string().trim().to_owned(),
            })?;
        validate::seed_convention(&mut fds)?;
        validate::check(&fds)?;
        let outputs: std::collections::BTreeSet<String> = fds
            .file
            .iter()
            .map(|f| match f.package() {
                "" => "_.rs".to_owned(),
                p => format!("{p}.rs"),
            })
            .collect();
        config.service_generator(Box::new(generator::Generator));
        config
            .compile_fds(fds)
            .map_err(|e| Error::Io(e.to_string()))?;
        let out_dir = match &self.out_dir {
            Some(d) => d.clone(),
            None => PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()),
        };
        rustfmt(outputs.iter().map(|name| out_dir.join(name)));
        if self.emit_rerun {
            for p in protos {
                println!("cargo:rerun-if-changed={}", p.as_ref().display());
            }
            for i in includes {
                println!("cargo:rerun-if-changed={}", i.as_ref().display());
            }
        }
        Ok(())
    }
}
