/* Layouts shared by the eBPF programs and the Rust loader (src/abi.rs mirrors them; a test
 * checks sizes and offsets against this header compiled for the host).
 *
 * Include after something that defines __u8, __u16, __u32 and __u64 (vmlinux.h in the BPF
 * program, <linux/types.h> on the host). Changing a layout changes the pinned maps' ABI: bump
 * MA_ABI_VERSION, which is part of the pin path. */
#ifndef MESHAUTH_ABI_H
#define MESHAUTH_ABI_H

#define MA_ABI_VERSION 5

/* Direction, from the pod's point of view. */
#define MA_DIR_EGRESS 0
#define MA_DIR_INGRESS 1

/* Policy verdicts. A missing entry denies. */
#define MA_VERDICT_ALLOW 1
#define MA_VERDICT_DENY 2

/* Authentication types (as Cilium's auth_type). */
#define MA_AUTH_NONE 0
#define MA_AUTH_REQUIRED 1
#define MA_AUTH_ALWAYS_FAIL 2
#define MA_AUTH_PER_CONNECTION 3 /* a fresh authentication per connection: the auth key names it */

/* Event verdicts and drop reasons. */
#define MA_EV_FORWARDED 0
#define MA_EV_DROPPED 1
#define MA_EV_HELD 2 /* marked for the node's hold queue until the pair authenticates */
#define MA_REASON_NONE 0
#define MA_REASON_POLICY_DENIED 1
#define MA_REASON_AUTH_REQUIRED 2
#define MA_REASON_NO_IDENTITY 3
#define MA_REASON_SPOOFED 4
#define MA_REASON_UNSUPPORTED 5
#define MA_REASON_UNENCRYPTED 6 /* from another node's pod, not out of the tunnel (encryption on) */
#define MA_REASON_COUNT 7

/* Event flags. */
#define MA_EVF_ESTABLISHED 1 /* the packet belonged to a tracked flow that was re-checked */

/* Per-CPU counters (ma_stats), one block per direction: index = direction * MA_STAT_PER_DIR +
 * stat, where stat is a drop reason [1, MA_REASON_COUNT), MA_STAT_FORWARDED or
 * MA_STAT_EVENTS_LOST. */
#define MA_STAT_FORWARDED MA_REASON_COUNT
#define MA_STAT_EVENTS_LOST (MA_REASON_COUNT + 1)
#define MA_STAT_PER_DIR (MA_REASON_COUNT + 2)
#define MA_STAT_COUNT (2 * MA_STAT_PER_DIR)

/* Map sizes. */
#define MA_MAX_ENDPOINTS 4096
#define MA_MAX_IPCACHE 65536
#define MA_MAX_POLICY 262144
#define MA_MAX_AUTH 131072
#define MA_MAX_CONNTRACK 262144

/* Default idle timeouts of tracked flows, seconds (as Cilium's: TCP 6 h, others 60 s). */
#define MA_CT_TIMEOUT_TCP 21600
#define MA_CT_TIMEOUT_OTHER 60

/* What to do with a packet whose pair is not authenticated yet. */
#define MA_AUTH_MISS_DROP 0
#define MA_AUTH_MISS_MARK 1 /* set skb->mark = hold_mark and pass, for a node-side hold queue */

/* Identities of pods (label sets) are in [MA_FIRST_POD_IDENTITY, MA_FIRST_LOCAL_IDENTITY);
 * below are the reserved ones (host, world, remote-node, ...), above the node-local CIDR ones. */
#define MA_FIRST_POD_IDENTITY 256
#define MA_FIRST_LOCAL_IDENTITY 0x1000000

/* Policy-map endpoint ids at and above this one hold a remote identity's ingress entries toward
 * this node's identities (MA_PEER_ENDPOINT_BASE + identity): a pod's egress to that identity
 * requires authentication where the peer's ingress does, so the sender holds the packet
 * instead of the receiver dropping it. Host-side ifindexes stay below it. */
#define MA_PEER_ENDPOINT_BASE 0x80000000

/* endpoints: key __u32 ifindex (host side of the pod's veth). */
struct ma_endpoint {
	__u32 endpoint_id;
	__u32 identity;
	__u32 ipv4; /* network byte order */
	__u32 flags;
	__u32 policy_gen; /* bumped on every change of this endpoint's policy entries */
	__u32 pad;
};

/* ipcache: LPM trie; IPv4 is stored as ::ffff:a.b.c.d with prefixlen 96 + n. */
struct ma_ipcache_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct ma_ipcache_value {
	__u32 identity; /* 0: no identity (dropped as MA_REASON_NO_IDENTITY, as a miss is) */
	__u32 node_id;  /* 0: this node */
};

/* policy: LPM trie over 96 data bits; the first 80 must match exactly, the port is a prefix.
 * The program tries (remote, protocol), (remote, any), (any, protocol), (any, any) in this
 * order and the first hit decides; src/policy_keys.rs plans the keys so that this answers
 * what meshauth_policy::lookup answers. The port looked up is the destination port for TCP,
 * UDP and SCTP, the ICMP type for ICMP (as Cilium does), 0 for every other protocol. */
struct ma_policy_key {
	__u32 prefixlen;
	__u32 endpoint_id;
	__u32 remote_identity; /* 0: any */
	__u8 direction;
	__u8 protocol;         /* 0: any */
	__u16 dport;           /* network byte order */
};

struct ma_policy_value {
	__u8 verdict;
	__u8 auth_type;
	__u16 pad;
};

/* auth: which pairs have authenticated, until when (CLOCK_BOOTTIME, ns). */
struct ma_auth_key {
	__u32 local_identity;
	__u32 remote_identity;
	__u32 remote_node;
	__u8 auth_type;
	/* MA_AUTH_PER_CONNECTION only (zero otherwise): the connection, as its first packet went
	 * (from the initiating pod; the same on both nodes). */
	__u8 protocol;
	__u16 pad;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

struct ma_auth_value {
	__u64 expires_ns;
};

/* conntrack: one entry per accepted flow and direction, created by the endpoint whose program
 * accepted it. ICMP: both ports are the echo id, and icmp_type is the type of the flow's
 * packets (an echo reply is looked up as the reverse of its request, type 8), so that a
 * packet of another type never rides on a flow accepted for one type. */
struct ma_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 direction;
	__u8 icmp_type; /* ICMP only; 0 for other protocols */
	__u8 pad;
};

#define MA_CT_HELD 1 /* waiting for authentication (hold mode): re-checked on every packet */
#define MA_CT_FIN_ORIG 2  /* per-connection TCP flow: FIN seen in the flow's direction */
#define MA_CT_FIN_REPLY 4 /* per-connection TCP flow: FIN seen in the reply direction */

/* What justified the flow: it passes on the fast path only while the endpoint, its policy
 * generation and the ipcache generation are those it was accepted under, it has not been idle
 * past its timeout, and (auth_key.auth_type != MA_AUTH_NONE) its auth entry is live.
 * Otherwise the packet is evaluated again as a new flow would be, and dropped with the reason
 * if that fails. */
struct ma_ct_value {
	__u64 created_ns;
	__u64 last_seen_ns;
	struct ma_auth_key auth_key; /* the entry the flow needs (auth_type NONE: none) */
	__u32 flags;
	__u32 endpoint_id;
	__u32 policy_gen;
	__u32 ipcache_gen;
};

/* config: array of one. */
struct ma_config {
	__u32 auth_miss_action;
	__u32 hold_mark;
	__u64 event_interval_ns; /* per-flow rate limit of events */
	__u32 ipcache_gen;       /* bumped when an ipcache entry changes or goes */
	__u32 ct_timeout_tcp_s;  /* idle timeout of tracked TCP flows (0: MA_CT_TIMEOUT_TCP) */
	__u32 ct_timeout_other_s; /* idle timeout of other tracked flows (0: MA_CT_TIMEOUT_OTHER) */
	/* Encryption on: the ifindex of the node's tunnel device (0: off). A packet into a pod
	 * from a pod of another node (local_node below) must have arrived on it. */
	__u32 tunnel_ifindex;
	__u32 local_node; /* this node's id, as the ipcache names it */
	__u32 pad;
};

/* events: ring buffer records. */
struct ma_event {
	__u64 ts_ns;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 verdict;
	__u8 reason;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u8 direction;
	__u8 flags; /* MA_EVF_* */
	__u8 icmp_type; /* ICMP: the type, which policy decided on in place of the port; else 0 */
	__u8 pad;
	struct ma_auth_key auth_key; /* set when reason is MA_REASON_AUTH_REQUIRED */
};

/* event rate limiter key */
struct ma_rl_key {
	__u32 saddr;
	__u32 daddr;
	__u16 dport;
	__u8 protocol;
	__u8 reason;
};

#endif
