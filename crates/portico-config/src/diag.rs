//! Located configuration problems: a key path, a source position, a message, a hint.

use std::fmt;

/// A 1-based line and column in the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A path into the configuration document, printed as `routes[2].upstream`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    pub fn push_key(&mut self, k: &str) {
        self.0.push(Seg::Key(k.to_string()));
    }

    pub fn push_index(&mut self, i: usize) {
        self.0.push(Seg::Index(i));
    }

    /// A new path one key deeper.
    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.push_key(k);
        p
    }

    /// A new path one index deeper.
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.push_index(i);
        p
    }

    /// Remove the last segment; false when already at the root.
    pub fn pop(&mut self) -> bool {
        self.0.pop().is_some()
    }

    /// Append every segment of `other`.
    pub fn append(&mut self, other: &KeyPath) {
        self.0.extend(other.0.iter().cloned());
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Build a path from a JSON pointer (`/routes/2/upstream`).
    pub fn from_pointer(ptr: &str) -> Self {
        let mut p = KeyPath::root();
        for raw in ptr.split('/').skip(1) {
            let seg = raw.replace("~1", "/").replace("~0", "~");
            match seg.parse::<usize>() {
                Ok(i) => p.push_index(i),
                Err(_) => p.push_key(&seg),
            }
        }
        p
    }

    /// Parse the printed form back (used by tests and the admin API).
    pub fn parse(s: &str) -> Self {
        let mut p = KeyPath::root();
        for part in s.split('.').filter(|s| !s.is_empty()) {
            let (name, rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !name.is_empty() {
                p.push_key(name);
            }
            for idx in rest.split('[').filter(|s| !s.is_empty()) {
                if let Ok(i) = idx.trim_end_matches(']').parse() {
                    p.push_index(i);
                }
            }
        }
        p
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                Seg::Index(i) => write!(f, "[{i}]")?,
                Seg::Key(k) => {
                    let plain = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if plain {
                        if !first {
                            f.write_str(".")?;
                        }
                        f.write_str(k)?;
                    } else {
                        write!(f, "[{k:?}]")?;
                    }
                }
            }
            first = false;
        }
        Ok(())
    }
}

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: Option<String>,
    pub pos: Option<Pos>,
    pub path: KeyPath,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(path: KeyPath, message: impl Into<String>) -> Self {
        Diagnostic {
            file: None,
            pos: None,
            path,
            message: message.into(),
            hint: None,
        }
    }

    pub fn at(mut self, pos: Pos) -> Self {
        self.pos = Some(pos);
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Add a "did you mean" hint when one of `candidates` is close to `got`.
    pub fn suggest<'a>(self, got: &str, candidates: impl IntoIterator<Item = &'a str>) -> Self {
        match closest(got, candidates) {
            Some(c) => self.hint(format!("did you mean `{c}`?")),
            None => self,
        }
    }
}

/// The candidate closest to `got`, if it is close enough to be a likely typo.
pub fn closest<'a>(got: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let got_l = got.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&got_l, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= (c.len().max(got.len()) / 3).max(1) + usize::from(c.len() > 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            f.write_str(file)?;
            if let Some(p) = self.pos {
                write!(f, ":{}:{}", p.line, p.col)?;
            }
            f.write_str(": ")?;
        } else if let Some(p) = self.pos {
            write!(f, "line {}, column {}: ", p.line, p.col)?;
        }
        if !self.path.is_root() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_display_and_parse() {
        let p = KeyPath::root().key("routes").index(2).key("upstream");
        assert_eq!(p.to_string(), "routes[2].upstream");
        assert_eq!(KeyPath::parse("routes[2].upstream"), p);
        assert_eq!(KeyPath::from_pointer("/routes/2/upstream"), p);
        let h = KeyPath::root().key("headers").key("x.y");
        assert_eq!(h.to_string(), "headers[\"x.y\"]");
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            closest("methdos", ["methods", "paths", "hosts"]),
            Some("methods")
        );
        assert_eq!(
            closest("upstrem", ["upstream", "upstreams"]),
            Some("upstream")
        );
        assert_eq!(closest("zzz", ["methods", "paths"]), None);
    }
}
