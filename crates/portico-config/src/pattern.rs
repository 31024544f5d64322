//! Route path patterns: `/exact`, `/users/{id}`, `/static/*` and `~regex`.

use std::fmt;

/// One segment of a `{param}` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Lit(String),
    Param(String),
}

/// A parsed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Matches exactly this path.
    Exact(String),
    /// Segments, some of them `{name}` captures of one non-empty segment.
    Params(Vec<Segment>),
    /// `/static/*`: the prefix (`/static`, or empty for `/*`), matching itself,
    /// itself with a trailing slash, and everything below.
    Prefix(String),
    /// `~^/v[0-9]+/`: a regular expression on the normalized path; named groups are captures.
    Regex(String),
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        if let Some(re) = s.strip_prefix('~') {
            let compiled =
                regex::Regex::new(re).map_err(|e| format!("invalid regular expression: {e}"))?;
            for name in compiled.capture_names().flatten() {
                if !valid_name(name) {
                    return Err(format!(
                        "capture name `{name}` must be letters, digits and `_`"
                    ));
                }
            }
            return Ok(PathPattern::Regex(re.to_string()));
        }
        if !s.starts_with('/') {
            return Err(format!(
                "`{s}` must start with `/` (or `~` for a regular expression)"
            ));
        }
        if s.contains("//") || s.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(format!(
                "`{s}` is not a normalized path (no `//`, `.` or `..` segments); requests are matched after normalization"
            ));
        }
        if s.contains(['?', '#']) {
            return Err(format!(
                "`{s}` contains `?` or `#`; paths match without the query"
            ));
        }
        let (body, prefix) = match s.strip_suffix("/*") {
            Some(p) => (p, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(format!(
                "`*` is only allowed as a final `/*` segment (in `{s}`)"
            ));
        }
        if prefix {
            if body.contains(['{', '}']) {
                return Err(format!(
                    "`{s}`: `{{param}}` captures cannot be combined with a `/*` prefix"
                ));
            }
            return Ok(PathPattern::Prefix(body.to_string()));
        }
        if !body.contains(['{', '}']) {
            return Ok(PathPattern::Exact(body.to_string()));
        }
        let mut segs = Vec::new();
        let mut names = Vec::<&str>::new();
        for seg in body.split('/').skip(1) {
            if let Some(name) = seg.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if !valid_name(name) {
                    return Err(format!(
                        "`{{{name}}}` in `{s}`: capture names are letters, digits and `_`"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("capture `{{{name}}}` appears twice in `{s}`"));
                }
                names.push(name);
                segs.push(Segment::Param(name.to_string()));
            } else if seg.contains(['{', '}']) {
                return Err(format!(
                    "`{seg}` in `{s}`: a capture must be a whole segment, like `/{{id}}`"
                ));
            } else {
                segs.push(Segment::Lit(seg.to_string()));
            }
        }
        Ok(PathPattern::Params(segs))
    }

    /// The capture names this pattern provides.
    pub fn captures(&self) -> Vec<String> {
        match self {
            PathPattern::Params(segs) => segs
                .iter()
                .filter_map(|s| match s {
                    Segment::Param(n) => Some(n.clone()),
                    Segment::Lit(_) => None,
                })
                .collect(),
            PathPattern::Regex(re) => regex::Regex::new(re)
                .map(|r| r.capture_names().flatten().map(str::to_string).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}/*"),
            PathPattern::Regex(r) => write!(f, "~{r}"),
            PathPattern::Params(segs) => {
                for s in segs {
                    match s {
                        Segment::Lit(l) => write!(f, "/{l}")?,
                        Segment::Param(p) => write!(f, "/{{{p}}}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            PathPattern::parse("/users"),
            Ok(PathPattern::Exact("/users".into()))
        );
        assert_eq!(
            PathPattern::parse("/static/*"),
            Ok(PathPattern::Prefix("/static".into()))
        );
        assert_eq!(
            PathPattern::parse("/*"),
            Ok(PathPattern::Prefix(String::new()))
        );
        assert_eq!(
            PathPattern::parse("/users/{id}"),
            Ok(PathPattern::Params(vec![
                Segment::Lit("users".into()),
                Segment::Param("id".into())
            ]))
        );
        assert!(matches!(
            PathPattern::parse("~^/v[0-9]+/"),
            Ok(PathPattern::Regex(_))
        ));
        assert!(PathPattern::parse("users").is_err());
        assert!(PathPattern::parse("/a/*/b").is_err());
        assert!(PathPattern::parse("/a/x{id}").is_err());
        assert!(PathPattern::parse("/a//b").is_err());
        assert!(PathPattern::parse("/a/../b").is_err());
        assert!(PathPattern::parse("~[").is_err());
        assert!(PathPattern::parse("/{a}/{a}").is_err());
        for p in ["/users", "/static/*", "/users/{id}/posts", "~^/v1"] {
            assert_eq!(
                PathPattern::parse(p).map(|x| x.to_string()),
                Ok(p.to_string())
            );
        }
    }
}
