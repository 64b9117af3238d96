//! Image scopes, as containers-policy.json writes them: `HOST`, `HOST/NAMESPACE` or
//! `HOST/REPO`, matching whole path components of a repository `HOST/REPO`. Signature rules
//! and key access rules name images this way.

use oci_client::Reference;

/// The repository of `reference` as scopes and cosign's payload name it: `HOST/REPO`.
pub fn repository_of(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// Whether `scope` (without a trailing `/`) covers `repository`: equal, or a prefix ending at
/// a `/` (`reg.io/team` covers `reg.io/team/app`, not `reg.io/teamwork`).
pub fn scope_matches(scope: &str, repository: &str) -> bool {
    repository == scope
        || repository
            .strip_prefix(scope)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_match_whole_path_components() {
        assert!(scope_matches("reg.io/team", "reg.io/team"));
        assert!(scope_matches("reg.io/team", "reg.io/team/app"));
        assert!(scope_matches("reg.io", "reg.io/x"));
        assert!(!scope_matches("reg.io/team", "reg.io/teamwork/x"));
        assert!(!scope_matches("reg.io", "reg.iox/y"));
    }
}
