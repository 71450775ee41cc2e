//! Emits the server trait, the register function and the typed client of each service.

use std::fmt::Write;

use heck::ToSnakeCase;
use prost_build::{Comments, Method, Service, ServiceGenerator};

pub(crate) struct Generator;

/// Strict and reserved keywords of every edition.
const KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Methods every value has by value (`Into`, `TryInto` in the prelude): a client method of
/// that name would lose to them in method lookup, so it gets the `_` too.
const BY_VALUE: &[&str] = &["into", "try_into"];

/// The Rust name of a method: snake case, with a trailing `_` for keywords and for the names
/// in [`BY_VALUE`].
pub(crate) fn rust_method(proto_name: &str) -> String {
    let snake = proto_name.to_snake_case();
    if KEYWORDS.contains(&snake.as_str()) || BY_VALUE.contains(&snake.as_str()) {
        format!("{snake}_")
    } else {
        snake
    }
}

/// The client methods generated for a method named `base` (`move_` for `Move`: the derived
/// names need no keyword escape, so they drop the trailing `_`).
pub(crate) fn client_methods(base: &str) -> [String; 4] {
    let stem = base.strip_suffix('_').unwrap_or(base);
    [
        base.to_owned(),
        format!("{stem}_timeout"),
        format!("{stem}_with_callback"),
        format!("post_{stem}"),
    ]
}

fn docs(comments: &Comments, buf: &mut String) {
    let mut text = String::new();
    comments.append_with_indent(0, &mut text);
    buf.push_str(&text);
}

fn wire_name(service: &Service, method: &Method) -> String {
    if service.package.is_empty() {
        format!("{}/{}", service.proto_name, method.proto_name)
    } else {
        format!(
            "{}.{}/{}",
            service.package, service.proto_name, method.proto_name
        )
    }
}

impl ServiceGenerator for Generator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let svc = &service.name;
        let snake = svc.to_snake_case();
        let full = if service.package.is_empty() {
            service.proto_name.clone()
        } else {
            format!("{}.{}", service.package, service.proto_name)
        };
        let cg = "::clustergo";
        let fut = "::core::future::Future";
        let send = "::core::marker::Send";
        let res = "::core::result::Result";

        // The server trait.
        docs(&service.comments, buf);
        let _ = writeln!(
            buf,
            "/// Server side of `{full}`: implement it (with `async fn`s) and pass it to \
             [`register_{snake}`]."
        );
        let _ = writeln!(
            buf,
            "pub trait {svc}Server: {send} + ::core::marker::Sync + 'static {{"
        );
        for m in &service.methods {
            docs(&m.comments, buf);
            let _ = writeln!(
                buf,
                "/// Serves `{wire}`.\n\
                 fn {name}(&self, ctx: {cg}::CallContext, request: {input}) -> impl {fut}<Output = {res}<{output}, {cg}::HandlerError>> + {send};",
                wire = wire_name(&service, m),
                name = rust_method(&m.proto_name),
                input = m.input_type,
                output = m.output_type,
            );
        }
        buf.push_str("}\n");

        // The register function.
        let _ = writeln!(
            buf,
            "/// Registers every method of `{full}` on `builder`, served by `server`.\n\
             pub fn register_{snake}<__CgServer: {svc}Server>(builder: {cg}::NodeBuilder, server: __CgServer) -> {cg}::NodeBuilder {{\n\
             let server = ::std::sync::Arc::new(server);"
        );
        for m in &service.methods {
            let _ = writeln!(
                buf,
                "let builder = {{\n\
                 let server = server.clone();\n\
                 builder.rpc_proto(\"{wire}\", move |ctx, request: {input}| {{\n\
                 let server = server.clone();\n\
                 async move {{ <__CgServer as {svc}Server>::{name}(&*server, ctx, request).await }}\n\
                 }})\n\
                 }};",
                wire = wire_name(&service, m),
                input = m.input_type,
                name = rust_method(&m.proto_name),
            );
        }
        buf.push_str("let _ = server;\nbuilder\n}\n");

        // The client.
        let _ = writeln!(
            buf,
            "/// Typed client of `{full}`, bound to a node and a target address.\n\
             #[derive(Debug, Clone)]\n\
             #[allow(dead_code)]\n\
             pub struct {svc}Client {{\n\
             node: {cg}::Node,\n\
             to: {cg}::LogicAddr,\n\
             }}\n\
             impl {svc}Client {{\n\
             /// A client that calls `to` through `node`.\n\
             pub fn new(node: &{cg}::Node, to: {cg}::LogicAddr) -> Self {{\n\
             Self {{ node: node.clone(), to }}\n\
             }}\n\
             /// The address this client calls.\n\
             pub fn target(&self) -> {cg}::LogicAddr {{\n\
             self.to\n\
             }}"
        );
        for m in &service.methods {
            let wire = wire_name(&service, m);
            let [call, timeout, callback, post] = client_methods(&rust_method(&m.proto_name));
            let (input, output) = (&m.input_type, &m.output_type);
            docs(&m.comments, buf);
            let _ = writeln!(
                buf,
                "/// Calls `{wire}` with the node's default timeout.\n\
                 pub async fn {call}(&self, request: &{input}) -> {res}<{output}, {cg}::RpcError> {{\n\
                 self.node.call_proto(self.to, \"{wire}\", request, ::core::option::Option::None).await\n\
                 }}\n\
                 /// Calls `{wire}`, waiting at most `timeout` (the handler sees it as its deadline).\n\
                 pub async fn {timeout}(&self, request: &{input}, timeout: ::core::time::Duration) -> {res}<{output}, {cg}::RpcError> {{\n\
                 self.node.call_proto(self.to, \"{wire}\", request, ::core::option::Option::Some(timeout)).await\n\
                 }}\n\
                 /// Calls `{wire}` and runs `callback` with the outcome, exactly once, on a runtime thread.\n\
                 pub fn {callback}<__CgCallback>(&self, request: &{input}, timeout: ::core::time::Duration, callback: __CgCallback)\n\
                 where __CgCallback: ::core::ops::FnOnce({res}<{output}, {cg}::RpcError>) + {send} + 'static {{\n\
                 self.node.call_proto_with_callback(self.to, \"{wire}\", request, timeout, callback)\n\
                 }}\n\
                 /// Calls `{wire}` one-way: no answer, `Ok` once queued.\n\
                 pub async fn {post}(&self, request: &{input}) -> {res}<(), {cg}::RpcError> {{\n\
                 self.node.post_proto(self.to, \"{wire}\", request).await\n\
                 }}"
            );
        }
        buf.push_str("}\n");
    }
}
