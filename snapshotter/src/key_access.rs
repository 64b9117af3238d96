//! Which workloads a key may open layers for: `[[key_access]]` rules tie a key (a private key's
//! id, or `provider:NAME`) to containerd namespaces and image scopes. A key no rule names opens
//! layers for every workload, as before rules existed; once a rule names a key, only the
//! rules that name it grant it.
//!
//! The namespace is containerd's (the first segment of the snapshot key containerd's metadata
//! store sends, which a client cannot choose beyond its own namespace); the image is the one
//! the Prepare names, whose manifest must contain the layer (checked against the registry).
//! Under Kubernetes every pod's images live in containerd's `k8s.io` namespace, so there a
//! rule separates Kubernetes from other containerd clients, and images by scope, but not one
//! pod from another (docs/semantics.md, threat model).

use crate::image_scope::scope_matches;
use crate::keys::Identities;

/// One `[[key_access]]` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRule {
    /// A key id (16 hex digits) or `provider:NAME`.
    pub key: String,
    /// containerd namespaces (`*`: any).
    pub namespaces: Vec<String>,
    /// Image scopes; empty: any image.
    pub images: Vec<String>,
}

/// Who asks for a layer: the containerd namespace and the image's repository (`HOST/REPO`).
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    /// containerd namespace (empty when the caller is not containerd's metadata store).
    pub namespace: &'a str,
    /// The image's repository.
    pub repository: &'a str,
}

impl std::fmt::Display for Workload<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let namespace = if self.namespace.is_empty() {
            "(none)"
        } else {
            self.namespace
        };
        write!(f, "namespace {namespace} (image {})", self.repository)
    }
}

/// The rules of a node.
#[derive(Clone, Debug, Default)]
pub struct KeyAccess {
    rules: Vec<AccessRule>,
}

impl KeyAccess {
    /// Rules as configured; says what is wrong with one that cannot be meant.
    pub fn new(mut rules: Vec<AccessRule>) -> Result<Self, String> {
        for rule in &mut rules {
            let is_key_id = rule.key.len() == 16 && rule.key.bytes().all(|b| b.is_ascii_hexdigit());
            let is_provider = rule
                .key
                .strip_prefix(crate::keyprovider::LABEL_PREFIX)
                .is_some_and(|name| fsformat::keywrap::check_provider_name(name).is_ok());
            if !is_key_id && !is_provider {
                return Err(format!(
                    "[[key_access]] key {:?}: give a key id (16 hex digits, as `sealctl inspect` shows) or provider:NAME",
                    rule.key
                ));
            }
            // Key ids are hex and match in any case; provider names are case-sensitive.
            if is_key_id {
                rule.key.make_ascii_lowercase();
            }
            if rule.namespaces.is_empty() || rule.namespaces.iter().any(String::is_empty) {
                return Err(format!(
                    "[[key_access]] key {}: namespaces must name at least one containerd namespace (\"*\" for any)",
                    rule.key
                ));
            }
            for scope in &mut rule.images {
                *scope = scope.trim_end_matches('/').to_string();
            }
        }
        Ok(KeyAccess { rules })
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether rules name `key` at all.
    pub fn restricts(&self, key: &str) -> bool {
        self.rules.iter().any(|rule| rule.key == key)
    }

    /// Whether `key` may open layers for `workload`.
    pub fn allows(&self, key: &str, workload: Workload<'_>) -> bool {
        let mut named = false;
        for rule in self.rules.iter().filter(|rule| rule.key == key) {
            named = true;
            let namespace = rule
                .namespaces
                .iter()
                .any(|ns| ns == "*" || (ns == workload.namespace && !ns.is_empty()));
            let image = rule.images.is_empty()
                || rule
                    .images
                    .iter()
                    .any(|scope| scope_matches(scope, workload.repository));
            if namespace && image {
                return true;
            }
        }
        !named
    }

    /// The identities `workload` may use, and the labels of those it may not.
    pub fn filter(
        &self,
        identities: &Identities,
        workload: Workload<'_>,
    ) -> (Identities, Vec<String>) {
        let mut allowed = Identities::default();
        let mut denied = Vec::new();
        for key in &identities.keys {
            let label = key.public().key_id().to_string();
            if self.allows(&label, workload) {
                allowed.keys.push(key.clone());
            } else {
                denied.push(label);
            }
        }
        for provider in &identities.providers {
            let label = format!("provider:{}", provider.name());
            if self.allows(&label, workload) {
                allowed.providers.push(provider.clone());
            } else {
                denied.push(label);
            }
        }
        (allowed, denied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(key: &str, namespaces: &[&str], images: &[&str]) -> AccessRule {
        AccessRule {
            key: key.into(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            images: images.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn at<'a>(namespace: &'a str, repository: &'a str) -> Workload<'a> {
        Workload {
            namespace,
            repository,
        }
    }

    #[test]
    fn a_named_key_opens_only_what_its_rules_grant() {
        let access = KeyAccess::new(vec![
            rule("provider:kms", &["team-a"], &["reg.io/team-a/"]),
            rule("provider:kms", &["k8s.io"], &["reg.io/shared"]),
            rule("00112233AABBCCDD", &["*"], &["reg.io/public"]),
        ])
        .unwrap();
        assert!(access.allows("provider:kms", at("team-a", "reg.io/team-a/app")));
        assert!(!access.allows("provider:kms", at("team-b", "reg.io/team-a/app")));
        assert!(!access.allows("provider:kms", at("team-a", "reg.io/team-ab/app")));
        assert!(access.allows("provider:kms", at("k8s.io", "reg.io/shared/x")));
        assert!(!access.allows("provider:kms", at("k8s.io", "reg.io/team-a/app")));
        assert!(!access.allows("provider:kms", at("", "reg.io/team-a/app")));
        // Key ids are matched case-insensitively, "*" is any namespace.
        assert!(access.allows("00112233aabbccdd", at("anything", "reg.io/public/x")));
        assert!(!access.allows("00112233aabbccdd", at("anything", "reg.io/private")));
        // Provider names keep their case, as providers are named in the config.
        let upper = KeyAccess::new(vec![rule(
            "provider:KMS-East",
            &["team-a"],
            &["reg.io/team-a/"],
        )])
        .unwrap();
        assert!(upper.allows("provider:KMS-East", at("team-a", "reg.io/team-a/app")));
        assert!(!upper.allows("provider:KMS-East", at("team-b", "reg.io/team-a/app")));
        // Keys no rule names are not restricted.
        assert!(!access.restricts("provider:vault"));
        assert!(access.allows("provider:vault", at("", "reg.io/x")));

        for bad in [
            rule("kms", &["a"], &[]),
            rule("provider:k m s", &["a"], &[]),
            rule("provider:kms", &[], &[]),
            rule("0011", &["a"], &[]),
        ] {
            assert!(KeyAccess::new(vec![bad.clone()]).is_err(), "{bad:?}");
        }
    }
}
