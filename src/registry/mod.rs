//! OCI distribution wire types: names, references, digests, media types and
//! the error envelope. Pure code, no I/O; everything here is validated against
//! the distribution-spec grammar before it can reach a file path or a URL.

pub mod digest;
pub mod error_code;
pub mod manifest;
pub mod media_type;
pub mod reference;

pub use digest::Digest;
pub use error_code::ErrorCode;
pub use reference::{
    docker_repository, split_image_name, split_registry, ImageRef, Reference, RegistryHost,
    Repository, Tag,
};
