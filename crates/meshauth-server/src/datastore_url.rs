//! `--datastore`: which store the server keeps its registry in.

use std::fmt;
use std::str::FromStr;

/// Where the server keeps its registry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DatastoreUrl {
    /// The embedded SQLite file in the data dir: one server.
    #[default]
    Sqlite,
    /// An etcd cluster that several server replicas share.
    Etcd {
        /// `host:port` of each etcd member the server may dial.
        endpoints: Vec<String>,
        /// The key prefix the trust domain's records live under (`None`: `/meshauth/<td>`).
        prefix: Option<String>,
    },
}

/// Why a `--datastore` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid --datastore {given:?}: {why}; use `sqlite` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`"
)]
pub struct InvalidDatastoreUrl {
    given: String,
    why: &'static str,
}

impl FromStr for DatastoreUrl {
    type Err = InvalidDatastoreUrl;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| InvalidDatastoreUrl {
            given: s.to_owned(),
            why,
        };
        if s == "sqlite" {
            return Ok(DatastoreUrl::Sqlite);
        }
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("unknown kind of datastore"))?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad("every etcd endpoint needs HOST:PORT"))?;
            if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad("every etcd endpoint needs HOST:PORT"));
            }
            if endpoints.iter().any(|e| e == host) {
                return Err(bad("an etcd endpoint is named twice"));
            }
            endpoints.push(host.to_owned());
        }
        let prefix = match prefix {
            None | Some("/") => None,
            Some(p) if p.ends_with('/') || p.contains("//") => {
                return Err(bad("the key prefix must not end in '/' or contain '//'"));
            }
            Some(p) => Some(p.to_owned()),
        };
        Ok(DatastoreUrl::Etcd { endpoints, prefix })
    }
}

impl fmt::Display for DatastoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatastoreUrl::Sqlite => f.write_str("sqlite"),
            DatastoreUrl::Etcd { endpoints, prefix } => {
                write!(f, "etcd://{}", endpoints.join(","))?;
                if let Some(p) = prefix {
                    f.write_str(p)?;
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
    fn sqlite_and_etcd_urls_parse_and_print_back() {
        assert_eq!("sqlite".parse(), Ok(DatastoreUrl::Sqlite));
        let url: DatastoreUrl = "etcd://10.0.0.1:2379,etcd-2:2379/meshauth/prod"
            .parse()
            .expect("valid");
        assert_eq!(
            url,
            DatastoreUrl::Etcd {
                endpoints: vec!["10.0.0.1:2379".into(), "etcd-2:2379".into()],
                prefix: Some("/meshauth/prod".into())
            }
        );
        assert_eq!(
            url.to_string(),
            "etcd://10.0.0.1:2379,etcd-2:2379/meshauth/prod"
        );
        assert_eq!(
            "etcd://127.0.0.1:2379".parse(),
            Ok(DatastoreUrl::Etcd {
                endpoints: vec!["127.0.0.1:2379".into()],
                prefix: None
            })
        );
    }

    #[test]
    fn bad_urls_say_what_to_fix() {
        for (url, why) in [
            ("mysql://x", "unknown kind"),
            ("etcd://", "HOST:PORT"),
            ("etcd://host", "HOST:PORT"),
            ("etcd://host:0", "HOST:PORT"),
            ("etcd://host:99999", "HOST:PORT"),
            ("etcd://a:1,a:1", "named twice"),
            ("etcd://a:1/p/", "must not end"),
        ] {
            let e = url.parse::<DatastoreUrl>().expect_err(url).to_string();
            assert!(
                e.contains(why) && e.contains("etcd://HOST:PORT"),
                "{url}: {e}"
            );
        }
    }
}
