//! The servers an agent knows (`--server HOST:PORT[,HOST:PORT...]`) and the schedule by which
//! it moves between them when a session fails ([`Failover`], pure: no I/O, no clock, no
//! randomness; the caller adds the jitter and sleeps).
//!
//! Any replica of the server serves the node API, so the list is an order of preference, not a
//! set of different servers: the agent starts with the first, and each failed session moves it
//! to the next one, wrapping around.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Why a `--server` value is not a list of servers. Each message is one sentence that says
/// what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerListError {
    /// No address at all.
    #[error("no server given: --server needs at least one HOST:PORT")]
    Empty,
    /// Two commas in a row, or one at either end.
    #[error(
        "the server list {list:?} has an empty entry: separate HOST:PORT addresses with single commas"
    )]
    EmptyEntry {
        /// The list as given.
        list: String,
    },
    /// `http://...` or the like.
    #[error("server address {addr:?} has a scheme: write HOST:PORT, without http:// or https://")]
    Scheme {
        /// The address as given.
        addr: String,
    },
    /// No `:PORT`.
    #[error(
        "server address {addr:?} has no port: write HOST:PORT (the server's node API listens on 8081 unless its --listen says otherwise)"
    )]
    MissingPort {
        /// The address as given.
        addr: String,
    },
    /// A port that is not a number from 1 to 65535.
    #[error(
        "server address {addr:?} has an invalid port: write HOST:PORT with a port from 1 to 65535"
    )]
    BadPort {
        /// The address as given.
        addr: String,
    },
    /// Nothing before `:PORT`.
    #[error("server address {addr:?} has no host: write HOST:PORT")]
    MissingHost {
        /// The address as given.
        addr: String,
    },
    /// A host that is neither a DNS name nor an IP address.
    #[error(
        "server address {addr:?} has an invalid host: write a DNS name, an IPv4 address or an IPv6 address in brackets ([::1]:8081)"
    )]
    BadHost {
        /// The address as given.
        addr: String,
    },
    /// The same server twice.
    #[error("server {addr} is listed twice: give each replica once, in the order of preference")]
    Duplicate {
        /// The address listed twice.
        addr: String,
    },
}

/// One server's node API address: `HOST:PORT`, `[IPV6]:PORT` for an IPv6 literal. Displayed as
/// it is dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    host: String,
    port: u16,
}

impl ServerAddr {
    /// The host: a DNS name or an IP address (an IPv6 address without its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether both name the same server (DNS names are compared without case).
    fn same_as(&self, other: &ServerAddr) -> bool {
        self.port == other.port && self.host.eq_ignore_ascii_case(&other.host)
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ServerAddr {
    type Err = ServerListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let addr = || s.to_owned();
        if s.is_empty() {
            return Err(ServerListError::Empty);
        }
        if s.contains("://") {
            return Err(ServerListError::Scheme { addr: addr() });
        }
        let (host, port, bracketed) = if let Some(rest) = s.strip_prefix('[') {
            let Some((host, tail)) = rest.split_once(']') else {
                return Err(ServerListError::BadHost { addr: addr() });
            };
            if !tail.is_empty() && !tail.starts_with(':') {
                return Err(ServerListError::BadHost { addr: addr() });
            }
            (host, tail.strip_prefix(':'), true)
        } else {
            match s.rsplit_once(':') {
                // `::1:8081` or `::1`: which colon starts the port cannot be told.
                Some((host, _)) if host.contains(':') => {
                    return Err(ServerListError::BadHost { addr: addr() });
                }
                Some((host, port)) => (host, Some(port), false),
                None => (s, None, false),
            }
        };
        let port = match port {
            None | Some("") => return Err(ServerListError::MissingPort { addr: addr() }),
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(ServerListError::BadPort { addr: addr() }),
            },
        };
        if host.is_empty() {
            return Err(ServerListError::MissingHost { addr: addr() });
        }
        let valid = if bracketed {
            host.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !valid {
            return Err(ServerListError::BadHost { addr: addr() });
        }
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

/// The servers an agent may use, in the order of preference: at least one, none twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList(Vec<ServerAddr>);

impl ServerList {
    /// A list of `addrs`, refused when empty or when a server is listed twice.
    pub fn new(addrs: Vec<ServerAddr>) -> Result<ServerList, ServerListError> {
        if addrs.is_empty() {
            return Err(ServerListError::Empty);
        }
        for (i, a) in addrs.iter().enumerate() {
            if addrs[..i].iter().any(|b| b.same_as(a)) {
                return Err(ServerListError::Duplicate {
                    addr: a.to_string(),
                });
            }
        }
        Ok(ServerList(addrs))
    }

    /// One list of several (`--server` given more than once), in order.
    pub fn join(
        lists: impl IntoIterator<Item = ServerList>,
    ) -> Result<ServerList, ServerListError> {
        ServerList::new(lists.into_iter().flat_map(|l| l.0).collect())
    }

    /// The servers, most preferred first.
    pub fn as_slice(&self) -> &[ServerAddr] {
        &self.0
    }

    /// The most preferred server.
    pub fn first(&self) -> &ServerAddr {
        self.get(0)
    }

    /// The server at `index`, wrapping around past the end.
    pub fn get(&self, index: usize) -> &ServerAddr {
        // Never empty (`new` refuses an empty list), so `index % len` is in range.
        let n = self.0.len().max(1);
        &self.0[index % n]
    }

    /// Every server once, starting at `start` and wrapping around, with its index.
    pub fn starting_at(&self, start: usize) -> impl Iterator<Item = (usize, &ServerAddr)> {
        let n = self.0.len();
        (0..n).map(move |k| {
            let i = (start + k) % n;
            (i, &self.0[i])
        })
    }
}

impl fmt::Display for ServerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl FromStr for ServerList {
    type Err = ServerListError;

    /// `HOST:PORT[,HOST:PORT...]`; spaces around an address are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(ServerListError::Empty);
        }
        let addrs = s
            .split(',')
            .map(|item| {
                if item.trim().is_empty() {
                    Err(ServerListError::EmptyEntry { list: s.to_owned() })
                } else {
                    item.parse()
                }
            })
            .collect::<Result<Vec<ServerAddr>, _>>()?;
        ServerList::new(addrs)
    }
}

/// How a session with a server ended, as [`Failover`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutcome {
    /// The server served (a sync message arrived), then the session ended: an error, or the
    /// server ended the stream.
    Served,
    /// The session ended without service: connect or attestation error, refused, stream
    /// dropped before the first sync message, or ended by the server before it.
    Failed,
    /// The node SVID was renewed: the session is redone at once on the same server, with the
    /// new SVID. `served` says whether it was served before.
    Renewed {
        /// Whether a sync message arrived in the session.
        served: bool,
    },
}

/// Where and when the next session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Index in the server list of the server to dial.
    pub index: usize,
    /// How long to wait first (before jitter).
    pub delay: Duration,
    /// Whether this is another server than the last session's.
    pub failed_over: bool,
}

/// The failover schedule over a list of `servers` servers.
///
/// Every session that ends (except for a node SVID renewal, redone at once on the same server)
/// moves to the next server, wrapping around. Failures are counted since the last session that
/// got service; a session that was served and then ended counts as the first. Within a round
/// (one attempt on each server) the next server is tried after `min`; when a whole round
/// failed, the wait is `min`, doubled for each further failed round, up to `max`. With one
/// server every failure ends a round: `min`, `2 min`, `4 min`, ... as a single server always
/// had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    servers: usize,
    current: usize,
    failures: u32,
    min: Duration,
    max: Duration,
}

impl Failover {
    /// A schedule over `servers` servers (at least one is assumed), starting at the first.
    pub fn new(servers: usize, min: Duration, max: Duration) -> Failover {
        Failover {
            servers: servers.max(1),
            current: 0,
            failures: 0,
            min,
            max: max.max(min),
        }
    }

    /// The same schedule, starting at server `index` (e.g. the one that attested the node).
    pub fn starting_at(mut self, index: usize) -> Failover {
        self.current = index % self.servers;
        self
    }

    /// The index of the server of the current (or next) session.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Failures since the last session that got service.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Where and when to go after a session ended with `outcome`.
    pub fn next(&mut self, outcome: SessionOutcome) -> Step {
        let from = self.current;
        match outcome {
            SessionOutcome::Renewed { served } => {
                if served {
                    self.failures = 0;
                }
                return Step {
                    index: from,
                    delay: Duration::ZERO,
                    failed_over: false,
                };
            }
            SessionOutcome::Served => self.failures = 1,
            SessionOutcome::Failed => self.failures = self.failures.saturating_add(1),
        }
        self.current = (from + 1) % self.servers;
        let n = u32::try_from(self.servers).unwrap_or(u32::MAX);
        let delay = if !self.failures.is_multiple_of(n) {
            self.min
        } else {
            // Round r (1, 2, ...) failed entirely: min * 2^(r-1), capped.
            let doublings = (self.failures / n).saturating_sub(1).min(31);
            self.min.saturating_mul(1u32 << doublings).min(self.max)
        };
        Step {
            index: self.current,
            delay,
            failed_over: self.current != from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn list(s: &str) -> Result<Vec<String>, String> {
        s.parse::<ServerList>()
            .map(|l| l.as_slice().iter().map(ToString::to_string).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn good_lists_parse_in_order() {
        assert_eq!(list("127.0.0.1:8081").unwrap(), ["127.0.0.1:8081"]);
        assert_eq!(
            list("s1.example:8081,10.0.0.2:9000, [::1]:8081 ").unwrap(),
            ["s1.example:8081", "10.0.0.2:9000", "[::1]:8081"]
        );
        assert_eq!(list("server_a:1").unwrap(), ["server_a:1"]);
        let l: ServerList = "b:2,a:1".parse().unwrap();
        assert_eq!(l.to_string(), "b:2,a:1");
        assert_eq!(l.first().to_string(), "b:2");
        assert_eq!(l.get(3).to_string(), "a:1", "wraps around");
        let v6: ServerAddr = "[fd00::1]:8081".parse().unwrap();
        assert_eq!((v6.host(), v6.port()), ("fd00::1", 8081));
        let order: Vec<usize> = l.starting_at(1).map(|(i, _)| i).collect();
        assert_eq!(order, [1, 0]);
    }

    #[test]
    fn bad_lists_are_refused_in_one_sentence() {
        let cases = [
            ("", "no server given: --server needs at least one HOST:PORT"),
            (
                " ",
                "no server given: --server needs at least one HOST:PORT",
            ),
            (
                "a:1,,b:2",
                "the server list \"a:1,,b:2\" has an empty entry: separate HOST:PORT addresses with single commas",
            ),
            (
                "a:1,",
                "the server list \"a:1,\" has an empty entry: separate HOST:PORT addresses with single commas",
            ),
            (
                "server.example",
                "server address \"server.example\" has no port: write HOST:PORT (the server's node API listens on 8081 unless its --listen says otherwise)",
            ),
            (
                "a:1,b",
                "server address \"b\" has no port: write HOST:PORT (the server's node API listens on 8081 unless its --listen says otherwise)",
            ),
            (
                "a:",
                "server address \"a:\" has no port: write HOST:PORT (the server's node API listens on 8081 unless its --listen says otherwise)",
            ),
            (
                "a:http",
                "server address \"a:http\" has an invalid port: write HOST:PORT with a port from 1 to 65535",
            ),
            (
                "a:0",
                "server address \"a:0\" has an invalid port: write HOST:PORT with a port from 1 to 65535",
            ),
            (
                "a:70000",
                "server address \"a:70000\" has an invalid port: write HOST:PORT with a port from 1 to 65535",
            ),
            (
                ":8081",
                "server address \":8081\" has no host: write HOST:PORT",
            ),
            (
                "::1:8081",
                "server address \"::1:8081\" has an invalid host: write a DNS name, an IPv4 address or an IPv6 address in brackets ([::1]:8081)",
            ),
            (
                "[nope]:8081",
                "server address \"[nope]:8081\" has an invalid host: write a DNS name, an IPv4 address or an IPv6 address in brackets ([::1]:8081)",
            ),
            (
                "a b:8081",
                "server address \"a b:8081\" has an invalid host: write a DNS name, an IPv4 address or an IPv6 address in brackets ([::1]:8081)",
            ),
            (
                "https://s1:8081",
                "server address \"https://s1:8081\" has a scheme: write HOST:PORT, without http:// or https://",
            ),
            (
                "s1:8081,s2:8081,S1:8081",
                "server S1:8081 is listed twice: give each replica once, in the order of preference",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(list(input).unwrap_err(), want, "{input:?}");
            assert!(!want.contains('\n'));
        }
    }

    #[test]
    fn several_flags_join_in_order_and_refuse_duplicates_across_them() {
        let a: ServerList = "a:1,b:2".parse().unwrap();
        let c: ServerList = "c:3".parse().unwrap();
        let joined = ServerList::join([a.clone(), c]).unwrap();
        assert_eq!(joined.to_string(), "a:1,b:2,c:3");
        let b: ServerList = "b:2".parse().unwrap();
        assert_eq!(
            ServerList::join([a, b]).unwrap_err(),
            ServerListError::Duplicate { addr: "b:2".into() }
        );
        assert_eq!(
            ServerList::join(Vec::new()).unwrap_err(),
            ServerListError::Empty
        );
    }

    fn steps(f: &mut Failover, outcomes: &[SessionOutcome]) -> Vec<(usize, u64)> {
        outcomes
            .iter()
            .map(|o| {
                let s = f.next(*o);
                (s.index, s.delay.as_millis() as u64)
            })
            .collect()
    }

    #[test]
    fn one_server_backs_off_as_before() {
        use SessionOutcome::*;
        let mut f = Failover::new(1, MIN, MAX);
        let got = steps(&mut f, &[Failed; 9]);
        let delays: Vec<u64> = got.iter().map(|s| s.1).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert!(got.iter().all(|s| s.0 == 0));
        // Served, then lost: the minimum again, then doubling.
        assert_eq!(steps(&mut f, &[Served, Failed]), [(0, 500), (0, 1000)]);
        let s = f.next(Failed);
        assert!(!s.failed_over, "one server never fails over");
    }

    #[test]
    fn failures_move_through_the_list_and_wrap_around() {
        use SessionOutcome::*;
        let mut f = Failover::new(3, MIN, MAX);
        assert_eq!(f.current(), 0);
        let got = steps(&mut f, &[Failed; 4]);
        assert_eq!(got.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 0, 1]);
        let s = Failover::new(3, MIN, MAX).next(Failed);
        assert!(s.failed_over);
        let started = Failover::new(3, MIN, MAX).starting_at(2);
        assert_eq!(started.current(), 2);
        assert_eq!(Failover::new(3, MIN, MAX).starting_at(7).current(), 1);
    }

    #[test]
    fn the_backoff_grows_per_full_round_of_failures() {
        use SessionOutcome::*;
        let mut f = Failover::new(2, MIN, MAX);
        let got = steps(&mut f, &[Failed; 16]);
        let delays: Vec<u64> = got.iter().map(|s| s.1).collect();
        // The next server after the minimum; after each round, the round's backoff.
        assert_eq!(
            delays,
            [
                500, 500, 500, 1000, 500, 2000, 500, 4000, 500, 8000, 500, 16000, 500, 30000, 500,
                30000
            ]
        );
        assert_eq!(f.failures(), 16);
        let mut f = Failover::new(3, MIN, MAX);
        let delays: Vec<u64> = steps(&mut f, &[Failed; 6]).iter().map(|s| s.1).collect();
        assert_eq!(delays, [500, 500, 500, 500, 500, 1000]);
    }

    #[test]
    fn service_resets_the_backoff() {
        use SessionOutcome::*;
        let mut f = Failover::new(2, MIN, MAX);
        steps(&mut f, &[Failed; 8]);
        assert_eq!(f.current(), 0);
        // Served by server 0, then lost: on to server 1 at once-ish, as a first failure.
        assert_eq!(steps(&mut f, &[Served]), [(1, 500)]);
        assert_eq!(f.failures(), 1);
        assert_eq!(steps(&mut f, &[Failed, Failed]), [(0, 500), (1, 500)]);
        // A renewal stays on the server at once; after service it resets the count too.
        assert_eq!(steps(&mut f, &[Renewed { served: false }]), [(1, 0)]);
        assert_eq!(f.failures(), 3);
        assert_eq!(steps(&mut f, &[Renewed { served: true }]), [(1, 0)]);
        assert_eq!(f.failures(), 0);
        assert_eq!(steps(&mut f, &[Failed, Failed]), [(0, 500), (1, 500)]);
    }

    #[test]
    fn huge_failure_counts_stay_capped() {
        let mut f = Failover::new(2, MIN, MAX);
        f.failures = u32::MAX - 3;
        for _ in 0..8 {
            let s = f.next(SessionOutcome::Failed);
            assert!(s.delay <= MAX);
        }
    }
}
