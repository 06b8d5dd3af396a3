//! Label sets and the selectors that match them.
//!
//! Labels are `key=value`. Keys may carry a Cilium source prefix (`k8s:app`, `any:app`); it is
//! dropped, so `k8s:app=x` and `app=x` are the same label and selectors written either way
//! match both.
//!
//! A pod's namespace is the label [`NAMESPACE_LABEL`] (`io.kubernetes.pod.namespace`, Cilium's
//! `k8s:io.kubernetes.pod.namespace`), added by [`Labels::with_namespace`]: it is what scopes a
//! `CiliumNetworkPolicy` to its namespace (see [`crate::policy`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Why labels or selectors are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Not `key=value`.
    #[error("invalid label {0:?}: expected key=value, e.g. app=client1")]
    Malformed(String),
    /// A key with characters Kubernetes does not allow.
    #[error("invalid label key {0:?}: use letters, digits, '-', '_', '.', '/'")]
    BadKey(String),
    /// An unknown matchExpressions operator.
    #[error("unknown matchExpressions operator {0:?}: use In, NotIn, Exists or DoesNotExist")]
    BadOperator(String),
    /// Not a Kubernetes namespace name (a DNS-1123 label).
    #[error(
        "invalid namespace {0:?}: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    BadNamespace(String),
    /// In/NotIn without values, or Exists/DoesNotExist with values.
    #[error("matchExpressions on {key:?}: {why}")]
    BadExpression {
        /// The key.
        key: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// The label that carries a pod's namespace (Cilium's `k8s:io.kubernetes.pod.namespace`; the
/// `k8s:` source prefix is dropped like every other).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// The key prefix of namespace labels in Cilium (`io.cilium.k8s.namespace.labels.<key>`): a
/// peer selector of a `CiliumNetworkPolicy` that names one is not scoped to the policy's
/// namespace (as in Cilium).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// Checks a namespace name: a DNS-1123 label (at most 63 lowercase letters, digits and `-`,
/// starting and ending with a letter or digit), as Kubernetes requires.
pub fn check_namespace(namespace: &str) -> Result<(), LabelError> {
    let b = namespace.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-');
    if ok {
        Ok(())
    } else {
        Err(LabelError::BadNamespace(namespace.to_owned()))
    }
}

fn strip_source(key: &str) -> &str {
    for p in ["k8s:", "any:", "container:", "unspec:"] {
        if let Some(rest) = key.strip_prefix(p) {
            return rest;
        }
    }
    key
}

pub(crate) fn check_key(key: &str) -> Result<String, LabelError> {
    let k = strip_source(key);
    if k.is_empty()
        || k.len() > 253
        || !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return Err(LabelError::BadKey(key.to_owned()));
    }
    Ok(k.to_owned())
}

/// A set of labels (one value per key), sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Builds from pairs, normalizing keys.
    pub fn from_pairs<K: AsRef<str>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, LabelError> {
        let mut m = BTreeMap::new();
        for (k, v) in pairs {
            m.insert(check_key(k.as_ref())?, v.into());
        }
        Ok(Labels(m))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(strip_source(key)).map(String::as_str)
    }

    /// Iterates `(key, value)` in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// These labels in namespace `namespace`: [`NAMESPACE_LABEL`] set to it, replacing any value
    /// the labels carried (a pod cannot choose its namespace by labelling itself). The server
    /// derives a pod's identity from these labels, so the same labels in two namespaces are two
    /// identities, and namespaced policies select pods by it.
    pub fn with_namespace(mut self, namespace: &str) -> Result<Self, LabelError> {
        check_namespace(namespace)?;
        self.0
            .insert(NAMESPACE_LABEL.to_owned(), namespace.to_owned());
        Ok(self)
    }

    /// The namespace ([`NAMESPACE_LABEL`]), if the labels carry one.
    pub fn namespace(&self) -> Option<&str> {
        self.get(NAMESPACE_LABEL)
    }
}

impl FromStr for Labels {
    type Err = LabelError;

    /// Parses `k=v,k2=v2`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pairs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| LabelError::Malformed(part.to_owned()))?;
            pairs.push((k.to_owned(), v.to_owned()));
        }
        Labels::from_pairs(pairs)
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// A matchExpressions operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl FromStr for Operator {
    type Err = LabelError;

    /// Case-insensitive, as Cilium lowercases operators (its own examples write `in`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "in" => Ok(Operator::In),
            "notin" => Ok(Operator::NotIn),
            "exists" => Ok(Operator::Exists),
            "doesnotexist" => Ok(Operator::DoesNotExist),
            other => Err(LabelError::BadOperator(other.to_owned())),
        }
    }
}

/// One matchExpressions requirement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// The operator.
    pub operator: Operator,
    /// The values (In/NotIn only).
    pub values: Vec<String>,
}

impl Requirement {
    /// Checks the operator against the values.
    pub fn new(key: &str, operator: Operator, values: Vec<String>) -> Result<Self, LabelError> {
        let key = check_key(key)?;
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => Err(LabelError::BadExpression {
                key,
                why: "In and NotIn need at least one value",
            }),
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                Err(LabelError::BadExpression {
                    key,
                    why: "Exists and DoesNotExist take no values",
                })
            }
            _ => Ok(Requirement {
                key,
                operator,
                values,
            }),
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::NotIn => v.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

/// A label selector: every matchLabels pair and every requirement must hold. The empty selector
/// matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    /// `matchLabels`.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector has a requirement on `key` (in `matchLabels` or `matchExpressions`),
    /// as Cilium's `HasKey`.
    pub fn has_key(&self, key: &str) -> bool {
        let key = strip_source(key);
        self.match_labels.contains_key(key) || self.match_expressions.iter().any(|r| r.key == key)
    }

    /// Whether the selector has a requirement on a key starting with `prefix`.
    pub fn has_key_prefix(&self, prefix: &str) -> bool {
        self.match_labels.keys().any(|k| k.starts_with(prefix))
            || self
                .match_expressions
                .iter()
                .any(|r| r.key.starts_with(prefix))
    }

    /// A selector of `key=value` pairs.
    pub fn from_labels(labels: &Labels) -> Self {
        Selector {
            match_labels: labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            match_expressions: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(s: &str) -> Labels {
        s.parse().unwrap()
    }

    #[test]
    fn labels_parse_and_normalize_sources() {
        let a = l("k8s:app=client1,tier=front");
        assert_eq!(a.get("app"), Some("client1"));
        assert_eq!(a.get("k8s:app"), Some("client1"));
        assert_eq!(a.to_string(), "app=client1,tier=front");
        assert!("app".parse::<Labels>().is_err());
        assert!("a b=c".parse::<Labels>().is_err());
    }

    #[test]
    fn expressions() {
        let req = |k: &str, op: Operator, vals: &[&str]| {
            Requirement::new(k, op, vals.iter().map(|v| v.to_string()).collect()).unwrap()
        };
        let sel = Selector {
            match_labels: BTreeMap::from([("app".into(), "web".into())]),
            match_expressions: vec![
                req("env", Operator::In, &["prod", "staging"]),
                req("canary", Operator::DoesNotExist, &[]),
            ],
        };
        assert!(sel.matches(&l("app=web,env=prod")));
        assert!(!sel.matches(&l("app=web,env=dev")));
        assert!(!sel.matches(&l("app=web,env=prod,canary=yes")));
        let not_in = Selector {
            match_expressions: vec![req("env", Operator::NotIn, &["prod"])],
            ..Default::default()
        };
        assert!(not_in.matches(&l("app=x")));
        assert!(!not_in.matches(&l("env=prod")));
        let exists = Selector {
            match_expressions: vec![req("env", Operator::Exists, &[])],
            ..Default::default()
        };
        assert!(exists.matches(&l("env=dev")) && !exists.matches(&l("app=x")));
        assert!(Selector::default().matches(&l("anything=1")));
        assert!(Requirement::new("env", Operator::In, vec![]).is_err());
        assert!(Requirement::new("env", Operator::Exists, vec!["x".into()]).is_err());
    }

    #[test]
    fn namespaces() {
        let a = l("app=web").with_namespace("prod").unwrap();
        assert_eq!(a.namespace(), Some("prod"));
        assert_eq!(a.get("k8s:io.kubernetes.pod.namespace"), Some("prod"));
        assert_eq!(a.to_string(), "app=web,io.kubernetes.pod.namespace=prod");
        // A label claiming another namespace is replaced.
        let b = l("app=web,k8s:io.kubernetes.pod.namespace=kube-system")
            .with_namespace("prod")
            .unwrap();
        assert_eq!(b, a);
        assert_eq!(l("app=web").namespace(), None);
        for bad in ["", "Prod", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert_eq!(
                l("app=web").with_namespace(bad).unwrap_err(),
                LabelError::BadNamespace(bad.to_owned()),
                "{bad:?}"
            );
        }
        for good in ["a", "0", "kube-system", &"a".repeat(63)] {
            assert!(check_namespace(good).is_ok(), "{good:?}");
        }
        let sel = Selector {
            match_labels: BTreeMap::from([("app".into(), "web".into())]),
            match_expressions: vec![
                Requirement::new("k8s:io.kubernetes.pod.namespace", Operator::Exists, vec![])
                    .unwrap(),
            ],
        };
        assert!(sel.has_key(NAMESPACE_LABEL) && sel.has_key("k8s:app") && !sel.has_key("x"));
        assert!(sel.has_key_prefix("io.kubernetes.") && !sel.has_key_prefix("io.cilium."));
    }
}
