//! The version policy: a node may join if its version has the controller's major
//! version and is not below `min_node_version`.

use std::fmt;

/// A `major.minor.patch` version (a `-suffix` or `+build` is ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Patch.
    pub patch: u64,
}

impl Version {
    /// Parses `1.2.3` (also `1.2.3-rc1`, `v1.2.3`).
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().trim_start_matches('v');
        let core = s.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let (major, minor, patch) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some(Version { major: major.parse().ok()?, minor: minor.parse().ok()?, patch: patch.parse().ok()? })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Which node versions may join.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionPolicy {
    /// The controller's own version (its major must match).
    pub controller: Version,
    /// The oldest node version accepted.
    pub min_node: Version,
}

impl VersionPolicy {
    /// `Ok` if `node` may join, else the reason for `conn:close`.
    pub fn check(&self, node: &str) -> Result<Version, String> {
        let v = Version::parse(node).ok_or_else(|| format!("version {node:?} is not major.minor.patch"))?;
        if v.major != self.controller.major {
            return Err(format!(
                "version {v} is incompatible: the controller runs {} and accepts major version {}",
                self.controller, self.controller.major
            ));
        }
        if v < self.min_node {
            return Err(format!("version {v} is below the minimum node version {}", self.min_node));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let p =
            VersionPolicy { controller: Version::parse("1.4.0").unwrap(), min_node: Version::parse("1.2.0").unwrap() };
        assert!(p.check("1.2.0").is_ok());
        assert!(p.check("v1.9.3-rc1").is_ok());
        assert!(p.check("1.1.9").unwrap_err().contains("below"));
        assert!(p.check("2.0.0").unwrap_err().contains("incompatible"));
        assert!(p.check("0.9.0").unwrap_err().contains("incompatible"));
        assert!(p.check("banana").unwrap_err().contains("not major.minor.patch"));
        assert!(p.check("1.2").is_err());
        assert!(p.check("1.2.3.4").is_err());
    }
}
