//! Generates the services the tests call.

fn main() -> Result<(), clustergo_build::Error> {
    clustergo_build::compile(
        &[
            "proto/multi.proto",
            "proto/a/chat.proto",
            "proto/b/chat.proto",
            "proto/seed/echo.proto",
            "proto/shop.proto",
            "proto/edge.proto",
        ],
        &["proto"],
    )
}
