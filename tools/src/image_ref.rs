//! Image references in skopeo's transport spelling.

use std::fmt;
use std::path::PathBuf;

/// Where an image lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:DIR[:TAG]`: an OCI image layout directory, optionally one tag in it.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The tag (`org.opencontainers.image.ref.name`), if given.
        tag: Option<String>,
    },
    /// `docker://HOST/REPO[:TAG][@DIGEST]`: an image in a registry.
    Registry {
        /// The reference without the transport prefix.
        reference: String,
    },
}

/// An image reference that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {text:?}: {reason}")]
pub struct ImageRefError {
    text: String,
    reason: String,
}

impl std::str::FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ImageRefError {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = text.strip_prefix("oci:") {
            // As skopeo: the tag is what follows the last colon, unless that would leave no dir.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !dir.is_empty() && !tag.contains('/') => (dir, Some(tag)),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(fail("the oci: transport needs a directory (oci:DIR[:TAG])"));
            }
            if tag.is_some_and(str::is_empty) {
                return Err(fail("empty tag after ':'"));
            }
            return Ok(ImageRef::Layout {
                dir: PathBuf::from(dir),
                tag: tag.map(str::to_string),
            });
        }
        if let Some(reference) = text.strip_prefix("docker://") {
            if reference.is_empty() || !reference.contains('/') {
                return Err(fail(
                    "the docker:// transport needs HOST/REPOSITORY[:TAG][@DIGEST]",
                ));
            }
            return Ok(ImageRef::Registry {
                reference: reference.to_string(),
            });
        }
        Err(fail(
            "expected a transport prefix: oci:DIR[:TAG] or docker://HOST/REPO[:TAG]",
        ))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout {
                dir,
                tag: Some(tag),
            } => write!(f, "oci:{}:{tag}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::Registry { reference } => write!(f, "docker://{reference}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout_refs() {
        let r: ImageRef = "oci:/tmp/img:v1".parse().unwrap();
        assert_eq!(
            r,
            ImageRef::Layout {
                dir: "/tmp/img".into(),
                tag: Some("v1".into())
            }
        );
        let r: ImageRef = "oci:img".parse().unwrap();
        assert_eq!(
            r,
            ImageRef::Layout {
                dir: "img".into(),
                tag: None
            }
        );
        assert!("oci:".parse::<ImageRef>().is_err());
        assert!("img".parse::<ImageRef>().is_err());
        let r: ImageRef = "docker://127.0.0.1:5000/app:v1".parse().unwrap();
        assert_eq!(
            r,
            ImageRef::Registry {
                reference: "127.0.0.1:5000/app:v1".into()
            }
        );
        assert!("docker://".parse::<ImageRef>().is_err());
    }
}
