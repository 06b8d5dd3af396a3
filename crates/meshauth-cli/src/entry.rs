//! `meshauth entry create|show|update|delete`: registration entries (flags as in SPIRE).

use std::time::Duration;

use meshauth_datastore::{EntryId, Selector};
use meshauth_proto::admin::{EntryRequest, ListEntriesRequest};
use meshauth_proto::node::Entry;
use meshauth_spiffe::SpiffeId;

use crate::common::{AdminSocket, Output, block_on, parse_duration, rpc};

/// Entry commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Args)]
struct EntryFields {
    /// The SPIFFE ID issued, e.g. spiffe://meshauth.local/web.
    #[arg(long)]
    spiffe_id: SpiffeId,
    /// The node allowed to obtain it, e.g. spiffe://meshauth.local/node/n1.
    #[arg(long)]
    parent_id: SpiffeId,
    /// A selector `type:value` the workload must match; repeat for several (all must match).
    #[arg(long = "selector", required = true)]
    selectors: Vec<Selector>,
    /// SVID lifetime, at least 1s and at most the server's CA lifetime (default: the server's
    /// --svid-ttl).
    #[arg(long, value_parser = parse_duration)]
    x509_svid_ttl: Option<Duration>,
    /// A DNS name to add to the SVID; repeatable.
    #[arg(long = "dns")]
    dns_names: Vec<String>,
}

impl EntryFields {
    /// The request. A TTL under one second is refused here: on the wire 0 means "the server's
    /// default", so it must not be rounded down (or silently up) to reach the server.
    fn into_msg(self, id: Option<EntryId>) -> anyhow::Result<Entry> {
        let ttl = match self.x509_svid_ttl {
            None => 0,
            Some(d) if d.as_secs() == 0 => anyhow::bail!(
                "--x509-svid-ttl {} is shorter than 1s: give at least 1s, or leave it out for the server's default",
                humantime::format_duration(d)
            ),
            // Past i64 the server refuses it as longer than the CA lifetime.
            Some(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        };
        Ok(Entry {
            id: id.map(|i| i.to_string()).unwrap_or_default(),
            spiffe_id: self.spiffe_id.to_string(),
            parent_id: self.parent_id.to_string(),
            selectors: self.selectors.iter().map(selector_msg).collect(),
            x509_svid_ttl_seconds: ttl,
            dns_names: self.dns_names,
            revision: 0,
        })
    }
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Register a workload identity.
    ///
    /// Example: meshauth entry create --spiffe-id spiffe://meshauth.local/web
    ///   --parent-id spiffe://meshauth.local/node/n1 --selector unix:uid:1000
    Create {
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List entries, or show one with --entry-id; filters combine.
    Show {
        /// Only this entry.
        #[arg(long)]
        entry_id: Option<EntryId>,
        /// Only entries with this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<SpiffeId>,
        /// Only entries with this parent.
        #[arg(long)]
        parent_id: Option<SpiffeId>,
        /// Only entries with this selector; repeatable.
        #[arg(long = "selector")]
        selectors: Vec<Selector>,
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Replace every field of an entry.
    Update {
        /// The entry to change.
        #[arg(long)]
        entry_id: EntryId,
        #[command(flatten)]
        fields: EntryFields,
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete an entry; agents stop serving its SVID at once.
    Delete {
        /// The entry to delete.
        #[arg(long)]
        entry_id: EntryId,
        #[command(flatten)]
        socket: AdminSocket,
    },
}

fn selector_msg(s: &Selector) -> meshauth_proto::node::Selector {
    meshauth_proto::node::Selector {
        r#type: s.kind.clone(),
        value: s.value.clone(),
    }
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    block_on(async move {
        match cmd.command {
            Sub::Create {
                fields,
                socket,
                output,
            } => {
                let msg = fields.into_msg(None)?;
                let mut c = socket.connect().await?;
                let e = c.create_entry(msg).await.map_err(rpc)?.into_inner();
                print_entries(&[e], output);
            }
            Sub::Show {
                entry_id: Some(id),
                socket,
                output,
                ..
            } => {
                let mut c = socket.connect().await?;
                let e = c
                    .get_entry(EntryRequest { id: id.to_string() })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_entries(&[e], output);
            }
            Sub::Show {
                entry_id: None,
                spiffe_id,
                parent_id,
                selectors,
                socket,
                output,
            } => {
                let mut c = socket.connect().await?;
                let list = c
                    .list_entries(ListEntriesRequest {
                        spiffe_id: spiffe_id.map(|s| s.to_string()).unwrap_or_default(),
                        parent_id: parent_id.map(|s| s.to_string()).unwrap_or_default(),
                        selectors: selectors.iter().map(selector_msg).collect(),
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_entries(&list.entries, output);
            }
            Sub::Update {
                entry_id,
                fields,
                socket,
                output,
            } => {
                let msg = fields.into_msg(Some(entry_id))?;
                let mut c = socket.connect().await?;
                let e = c.update_entry(msg).await.map_err(rpc)?.into_inner();
                print_entries(&[e], output);
            }
            Sub::Delete { entry_id, socket } => {
                let mut c = socket.connect().await?;
                c.delete_entry(EntryRequest {
                    id: entry_id.to_string(),
                })
                .await
                .map_err(rpc)?;
                out!("deleted entry {entry_id}");
            }
        }
        Ok(())
    })
}

fn entry_json(e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl_seconds": e.x509_svid_ttl_seconds,
        "dns_names": e.dns_names,
        "revision": e.revision,
    })
}

fn print_entries(entries: &[Entry], output: Output) {
    match output {
        Output::Json => out!(
            "{}",
            serde_json::Value::from(entries.iter().map(entry_json).collect::<Vec<_>>())
        ),
        Output::Text => {
            if entries.is_empty() {
                out!("no entries");
            }
            for (i, e) in entries.iter().enumerate() {
                if i > 0 {
                    out!();
                }
                out!("Entry ID      : {}", e.id);
                out!("SPIFFE ID     : {}", e.spiffe_id);
                out!("Parent ID     : {}", e.parent_id);
                for s in &e.selectors {
                    out!("Selector      : {}:{}", s.r#type, s.value);
                }
                match e.x509_svid_ttl_seconds {
                    0 => out!("X509-SVID TTL : default"),
                    s => out!("X509-SVID TTL : {s}s"),
                }
                for d in &e.dns_names {
                    out!("DNS name      : {d}");
                }
                out!("Revision      : {}", e.revision);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn fields(ttl: Option<Duration>) -> EntryFields {
        EntryFields {
            spiffe_id: "spiffe://td/web".parse().unwrap(),
            parent_id: "spiffe://td/node/n1".parse().unwrap(),
            selectors: vec!["unix:uid:1000".parse().unwrap()],
            x509_svid_ttl: ttl,
            dns_names: vec![],
        }
    }

    #[test]
    fn ttls_under_a_second_are_refused_before_the_server_sees_them() {
        for short in [Duration::ZERO, Duration::from_millis(500)] {
            let err = fields(Some(short)).into_msg(None).unwrap_err().to_string();
            assert!(err.contains("shorter than 1s"), "{err}");
        }
        let ttl = |d| fields(d).into_msg(None).unwrap().x509_svid_ttl_seconds;
        assert_eq!(ttl(None), 0, "0 is the server's default");
        assert_eq!(ttl(Some(Duration::from_millis(1500))), 1);
        assert_eq!(ttl(Some(Duration::from_secs(u64::MAX))), i64::MAX);
    }
}
