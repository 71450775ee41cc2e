//! Checks on the descriptor set before generation, and the seed's request/response convention.

use std::collections::HashMap;

use heck::{ToSnakeCase, ToUpperCamelCase};
use prost_types::source_code_info::Location;
use prost_types::{
    DescriptorProto, FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto,
};

use crate::Error;
use crate::generator::{client_methods, rust_method};

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Gives a file in the seed's convention (messages `request` and `response`, no service) a
/// one-method service named after the file, and a package named after the file if it has none.
pub(crate) fn seed_convention(fds: &mut FileDescriptorSet) -> Result<(), Error> {
    for file in &mut fds.file {
        if !file.service.is_empty() {
            continue;
        }
        let find = |name: &str| {
            file.message_type
                .iter()
                .find(|m| m.name().eq_ignore_ascii_case(name))
                .map(|m| m.name().to_owned())
        };
        let (Some(request), Some(response)) = (find("request"), find("response")) else {
            continue;
        };
        let file_name = file.name().to_owned();
        let stem = std::path::Path::new(&file_name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_snake_case();
        if !is_ident(&stem) {
            return Err(Error::Unsupported {
                file: file_name,
                item: "request/response convention".into(),
                reason: format!(
                    "the file name must make an identifier to name the service, not {stem:?}"
                ),
            });
        }
        if file.package().is_empty() {
            let locals: Vec<String> = file
                .message_type
                .iter()
                .map(|m| m.name().to_owned())
                .chain(file.enum_type.iter().map(|e| e.name().to_owned()))
                .collect();
            for m in &mut file.message_type {
                requalify(m, &locals, &stem);
            }
            file.package = Some(stem.clone());
        }
        let package = file.package().to_owned();
        // The generator looks up comments by source path; give the new items empty ones.
        let index = file.service.len() as i32;
        if let Some(info) = &mut file.source_code_info {
            for path in [vec![6, index], vec![6, index, 2, 0]] {
                info.location.push(Location {
                    path,
                    span: vec![0, 0, 0],
                    ..Default::default()
                });
            }
        }
        file.service.push(ServiceDescriptorProto {
            name: Some(stem.to_upper_camel_case()),
            method: vec![MethodDescriptorProto {
                name: Some("Call".into()),
                input_type: Some(format!(".{package}.{request}")),
                output_type: Some(format!(".{package}.{response}")),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    Ok(())
}

/// Points references to the file's own top-level types (`.request`) into its new package.
fn requalify(m: &mut DescriptorProto, locals: &[String], package: &str) {
    for f in &mut m.field {
        if let Some(t) = &f.type_name {
            let first = t
                .trim_start_matches('.')
                .split('.')
                .next()
                .unwrap_or_default();
            if t.starts_with('.') && locals.iter().any(|l| l == first) {
                f.type_name = Some(format!(".{package}{t}"));
            }
        }
    }
    for nested in &mut m.nested_type {
        requalify(nested, locals, package);
    }
}

/// Rejects what the generator cannot express: streaming methods and name collisions.
pub(crate) fn check(fds: &FileDescriptorSet) -> Result<(), Error> {
    // Module-level names per package: message and enum types, then what services add.
    let mut names: HashMap<String, HashMap<String, String>> = HashMap::new();
    for file in &fds.file {
        let taken = names.entry(file.package().to_owned()).or_default();
        for m in &file.message_type {
            taken.insert(
                m.name().to_upper_camel_case(),
                format!("message {}", m.name()),
            );
        }
        for e in &file.enum_type {
            taken.insert(e.name().to_upper_camel_case(), format!("enum {}", e.name()));
        }
    }
    for file in &fds.file {
        let file_name = file.name().to_owned();
        for service in &file.service {
            let svc = service.name().to_upper_camel_case();
            let what = format!("service {}", service.name());
            let taken = names.entry(file.package().to_owned()).or_default();
            for generated in [
                format!("{svc}Server"),
                format!("{svc}Client"),
                format!("register_{}", svc.to_snake_case()),
            ] {
                if let Some(other) = taken.insert(generated.clone(), what.clone()) {
                    return Err(Error::Collision {
                        file: file_name,
                        item: format!("{what} (its generated `{generated}`)"),
                        other,
                    });
                }
            }
            let mut methods: HashMap<String, String> = HashMap::new();
            for reserved in ["new", "target"] {
                methods.insert(reserved.into(), format!("the client's own `{reserved}`"));
            }
            for method in &service.method {
                let item = format!("{what}, method {}", method.name());
                if method.client_streaming() || method.server_streaming() {
                    return Err(Error::Unsupported {
                        file: file_name,
                        item,
                        reason: "streaming methods are not supported; use a stream between nodes or one-way messages".into(),
                    });
                }
                let base = rust_method(method.name());
                for generated in client_methods(&base) {
                    if let Some(other) = methods.insert(generated.clone(), item.clone()) {
                        return Err(Error::Collision {
                            file: file_name,
                            item: format!("{item} (its generated `{generated}`)"),
                            other,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}
