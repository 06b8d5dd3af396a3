// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* meshauth datapath: tc programs on the node side of each pod's veth.
 *
 *   from_pod  (tc ingress of the host-side veth) sees what the pod sends: egress policy.
 *   to_pod    (tc egress of the host-side veth) sees what the pod receives: ingress policy.
 *
 * Per packet: anti-spoofing (from_pod), conntrack (replies and established flows pass), remote
 * identity from the ipcache, policy lookup with wildcards and port prefixes, then, where the
 * policy requires authentication, the auth map with its expiry. Drops and new flows are
 * reported on the events ring buffer, rate-limited per flow so the datapath never waits.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"

#ifndef LIBBPF_PIN_BY_NAME
#define LIBBPF_PIN_BY_NAME 1
#endif

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MA_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct ma_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MA_MAX_IPCACHE);
	__type(key, struct ma_ipcache_key);
	__type(value, struct ma_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MA_MAX_POLICY);
	__type(key, struct ma_policy_key);
	__type(value, struct ma_policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MA_MAX_AUTH);
	__type(key, struct ma_auth_key);
	__type(value, struct ma_auth_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_auth SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MA_MAX_CONNTRACK);
	__type(key, struct ma_ct_key);
	__type(value, struct ma_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ma_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ma_rl_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_event_rl SEC(".maps");

/* Per-CPU counters, per direction (see MA_STAT_* in abi.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MA_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_stats SEC(".maps");

/* The ICMP header fields this program reads (linux/icmp.h pulls in libc headers). */
#define MA_ICMP_ECHOREPLY 0
#define MA_ICMP_ECHO 8
struct ma_icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 id;
	__u16 sequence;
};

struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* host byte order */
	__u16 dport; /* host byte order */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 icmp_reply; /* echo reply: the reverse of an echo request */
	__u8 icmp_type;  /* ICMP: the type, which policy looks up in place of the port */
};

static __always_inline void count(__u8 direction, __u32 stat)
{
	__u32 idx = (direction ? MA_STAT_PER_DIR : 0) + stat;
	__u64 *v = bpf_map_lookup_elem(&ma_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline struct ma_config *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&ma_config, &zero);
}

static __always_inline void emit(struct __sk_buff *skb, const struct flow *f, __u8 verdict,
				 __u8 reason, __u32 src_id, __u32 dst_id, __u8 direction,
				 const struct ma_auth_key *auth_key, __u8 flags)
{
	struct ma_config *cfg = config();
	__u64 interval = cfg ? cfg->event_interval_ns : 0;
	__u64 now = bpf_ktime_get_boot_ns();
	struct ma_rl_key rl = {
		.saddr = f->saddr,
		.daddr = f->daddr,
		.dport = f->dport,
		.protocol = f->protocol,
		.reason = reason,
	};
	__u64 *last = bpf_map_lookup_elem(&ma_event_rl, &rl);
	if (last && interval && now - *last < interval)
		return;
	bpf_map_update_elem(&ma_event_rl, &rl, &now, BPF_ANY);

	struct ma_event *e = bpf_ringbuf_reserve(&ma_events, sizeof(*e), 0);
	if (!e) {
		count(direction, MA_STAT_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = now;
	e->saddr = f->saddr;
	e->daddr = f->daddr;
	e->sport = f->sport;
	e->dport = f->dport;
	e->protocol = f->protocol;
	e->tcp_flags = f->tcp_flags;
	e->verdict = verdict;
	e->reason = reason;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	e->ifindex = skb->ifindex;
	e->direction = direction;
	e->flags = flags;
	e->icmp_type = f->protocol == IPPROTO_ICMP ? f->icmp_type : 0;
	if (auth_key)
		e->auth_key = *auth_key;
	bpf_ringbuf_submit(e, 0);
}

/* Parses Ethernet + IPv4 + L4. Returns 0 on success, 1 for non-IP traffic to pass, -1 to drop. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return 1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1; /* IPv6 and the rest: not supported by this datapath yet */
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return -1;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->protocol = ip->protocol;
	void *l4 = (void *)ip + ihl;
	/* Non-first fragments carry no ports: treat them by addresses only. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end)
			return -1;
		f->sport = bpf_ntohs(tcp->source);
		f->dport = bpf_ntohs(tcp->dest);
		f->tcp_flags = ((__u8 *)tcp)[13];
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return -1;
		f->sport = bpf_ntohs(udp->source);
		f->dport = bpf_ntohs(udp->dest);
	} else if (ip->protocol == IPPROTO_SCTP) {
		/* The SCTP common header starts with the ports, as UDP's does. */
		struct udphdr *sctp = l4;
		if ((void *)(sctp + 1) > end)
			return -1;
		f->sport = bpf_ntohs(sctp->source);
		f->dport = bpf_ntohs(sctp->dest);
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct ma_icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > end)
			return -1;
		/* Echo id serves as both ports so that request and reply match in conntrack; the
		 * type is what policy decides by. */
		f->sport = bpf_ntohs(icmp->id);
		f->dport = f->sport;
		f->icmp_type = icmp->type;
		f->icmp_reply = icmp->type == MA_ICMP_ECHOREPLY;
	}
	return 0;
}

static __always_inline struct ma_ipcache_value *ipcache_lookup(__u32 addr)
{
	struct ma_ipcache_key k = { .prefixlen = 128 };
	k.addr[10] = 0xff;
	k.addr[11] = 0xff;
	__builtin_memcpy(&k.addr[12], &addr, 4);
	return bpf_map_lookup_elem(&ma_ipcache, &k);
}

/* Looks up policy: (remote, protocol), (remote, any), (any, protocol), (any, any), each a
 * longest-prefix match over the port; the first hit decides (see abi.h). The port is the
 * destination port for TCP, UDP and SCTP, the ICMP type for ICMP, 0 otherwise. Returns the
 * verdict (0 when nothing matched: deny) and the auth type through *auth. */
static __always_inline __u8 policy_lookup(__u32 endpoint_id, __u8 direction, __u32 remote,
					  const struct flow *f, __u8 *auth)
{
	*auth = MA_AUTH_NONE;
	__u16 port = 0;
	if (f->protocol == IPPROTO_TCP || f->protocol == IPPROTO_UDP ||
	    f->protocol == IPPROTO_SCTP)
		port = f->dport;
	else if (f->protocol == IPPROTO_ICMP)
		port = f->icmp_type;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		struct ma_policy_key k = {
			.prefixlen = 96,
			.endpoint_id = endpoint_id,
			.remote_identity = (i & 2) ? 0 : remote,
			.direction = direction,
			.protocol = (i & 1) ? 0 : f->protocol,
			.dport = bpf_htons(port),
		};
		struct ma_policy_value *v = bpf_map_lookup_elem(&ma_policy, &k);
		if (!v)
			continue;
		if (v->verdict == MA_VERDICT_ALLOW) {
			*auth = v->auth_type;
			return MA_VERDICT_ALLOW;
		}
		return MA_VERDICT_DENY;
	}
	return 0;
}

static __always_inline int drop(struct __sk_buff *skb, const struct flow *f, __u8 reason,
				__u32 src_id, __u32 dst_id, __u8 direction,
				const struct ma_auth_key *auth_key, __u8 flags)
{
	count(direction, reason);
	emit(skb, f, MA_EV_DROPPED, reason, src_id, dst_id, direction, auth_key, flags);
	return TC_ACT_SHOT;
}

static __always_inline void ct_key(struct ma_ct_key *k, const struct flow *f, __u8 direction)
{
	k->saddr = f->saddr;
	k->daddr = f->daddr;
	k->sport = f->sport;
	k->dport = f->dport;
	k->protocol = f->protocol;
	k->direction = direction;
	k->icmp_type = f->protocol == IPPROTO_ICMP ? f->icmp_type : 0;
	k->pad = 0;
}

static __always_inline int authenticated(const struct ma_auth_key *k)
{
	struct ma_auth_value *av = bpf_map_lookup_elem(&ma_auth, k);
	return av && av->expires_ns > bpf_ktime_get_boot_ns();
}

/* What policy says of a flow, as a new flow: the identities, the auth entry it needs, and
 * MA_REASON_NONE when it may pass (auth entry included). */
struct decision {
	__u32 src_id;
	__u32 dst_id;
	struct ma_auth_key ak;
	__u8 reason;
};

static __always_inline void decide(const struct flow *f, const struct ma_endpoint *ep,
				   __u8 direction, struct decision *d)
{
	__u32 remote_addr = direction == MA_DIR_EGRESS ? f->daddr : f->saddr;
	struct ma_ipcache_value *remote = ipcache_lookup(remote_addr);
	d->src_id = direction == MA_DIR_EGRESS ? ep->identity : 0;
	d->dst_id = direction == MA_DIR_EGRESS ? 0 : ep->identity;
	/* No entry, or the entry of an address inside the cluster that nothing has (a pod range
	 * without the pod, an address two pods claim): identity 0, never allowed. */
	if (!remote || remote->identity == 0) {
		d->reason = MA_REASON_NO_IDENTITY;
		return;
	}
	__u32 remote_id = remote->identity;
	/* Both fields written (not one chosen by direction: clang would compute the field's
	 * address with a bitwise or, which the verifier refuses on a stack pointer). */
	d->src_id = direction == MA_DIR_EGRESS ? ep->identity : remote_id;
	d->dst_id = direction == MA_DIR_EGRESS ? remote_id : ep->identity;
	__u8 auth = MA_AUTH_NONE;
	if (policy_lookup(ep->endpoint_id, direction, remote_id, f, &auth) != MA_VERDICT_ALLOW) {
		d->reason = MA_REASON_POLICY_DENIED;
		return;
	}
	/* What a pod sends is held (below) for the authentication the receiver's ingress policy
	 * requires, rather than dropped there: the remote identity's ingress entries toward this
	 * node's identities sit under a peer endpoint id, looked up the same way. */
	if (direction == MA_DIR_EGRESS && auth != MA_AUTH_ALWAYS_FAIL) {
		__u8 peer_auth = MA_AUTH_NONE;
		/* The stronger requirement wins, as `policy trace` combines the two directions
		 * (`AuthType::max`: none < required < per connection < always fail; the raw values
		 * are not in that order, hence the explicit test). */
		if (policy_lookup(MA_PEER_ENDPOINT_BASE | remote_id, MA_DIR_INGRESS, ep->identity, f,
				  &peer_auth) == MA_VERDICT_ALLOW &&
		    peer_auth != MA_AUTH_NONE &&
		    (auth == MA_AUTH_NONE || peer_auth == MA_AUTH_PER_CONNECTION ||
		     peer_auth == MA_AUTH_ALWAYS_FAIL))
			auth = peer_auth;
	}
	d->ak.local_identity = ep->identity;
	d->ak.remote_identity = remote_id;
	d->ak.remote_node = remote->node_id;
	d->ak.auth_type = auth;
	if (auth == MA_AUTH_PER_CONNECTION) {
		/* The entry is the connection's, as its first packet went (`f` is the flow as
		 * accepted: a reply is decided as the flow it answers). */
		d->ak.protocol = f->protocol;
		d->ak.saddr = f->saddr;
		d->ak.daddr = f->daddr;
		d->ak.sport = f->sport;
		d->ak.dport = f->dport;
	}
	if (auth != MA_AUTH_NONE && !authenticated(&d->ak)) {
		d->reason = MA_REASON_AUTH_REQUIRED;
		return;
	}
	d->reason = MA_REASON_NONE;
}

static __always_inline __u64 ct_timeout_ns(const struct ma_config *cfg, __u8 protocol)
{
	__u64 s;
	if (protocol == IPPROTO_TCP)
		s = (cfg && cfg->ct_timeout_tcp_s) ? cfg->ct_timeout_tcp_s : MA_CT_TIMEOUT_TCP;
	else
		s = (cfg && cfg->ct_timeout_other_s) ? cfg->ct_timeout_other_s : MA_CT_TIMEOUT_OTHER;
	return s * 1000000000ULL;
}

/* Whether a tracked flow may pass on the fast path (see struct ma_ct_value). */
static __always_inline int ct_valid(const struct ma_ct_value *ct, const struct ma_endpoint *ep,
				    const struct ma_config *cfg, __u8 protocol, __u64 now)
{
	if (ct->flags & MA_CT_HELD)
		return 0;
	if (ct->endpoint_id != ep->endpoint_id || ct->policy_gen != ep->policy_gen)
		return 0;
	if (ct->ipcache_gen != (cfg ? cfg->ipcache_gen : 0))
		return 0;
	if (now - ct->last_seen_ns > ct_timeout_ns(cfg, protocol))
		return 0;
	if (ct->auth_key.auth_type != MA_AUTH_NONE && !authenticated(&ct->auth_key))
		return 0;
	return 1;
}

/* Records what justified an accepted flow (in place when `ct` is the existing entry). */
static __always_inline void ct_store(struct ma_ct_value *ct, const struct flow *f, __u8 direction,
				     const struct ma_endpoint *ep, const struct ma_config *cfg,
				     const struct ma_auth_key *ak, __u32 flags, __u64 now)
{
	struct ma_ct_value v = {
		.created_ns = ct ? ct->created_ns : now,
		.last_seen_ns = now,
		.auth_key = *ak,
		.flags = flags,
		.endpoint_id = ep->endpoint_id,
		.policy_gen = ep->policy_gen,
		.ipcache_gen = cfg ? cfg->ipcache_gen : 0,
	};
	if (ct) {
		*ct = v;
		return;
	}
	struct ma_ct_key k;
	ct_key(&k, f, direction);
	bpf_map_update_elem(&ma_conntrack, &k, &v, BPF_ANY);
}

#define MA_TCP_FIN 0x01
#define MA_TCP_RST 0x04
#define MA_TCP_ACK 0x10

/* A per-connection TCP flow's close takes its authentication with it: an RST, or the first
 * ACK without FIN after FINs went both ways, removes the flow's conntrack and auth entries
 * (the packet itself passes). The next connection of the pair authenticates afresh. */
static __always_inline void per_connection_close(struct ma_ct_value *ct, const struct ma_ct_key *k,
						 const struct flow *f, int is_reply)
{
	__u32 both = MA_CT_FIN_ORIG | MA_CT_FIN_REPLY;
	int closed = 0;
	if (f->tcp_flags & MA_TCP_RST)
		closed = 1;
	else if (f->tcp_flags & MA_TCP_FIN)
		ct->flags |= is_reply ? MA_CT_FIN_REPLY : MA_CT_FIN_ORIG;
	else if ((ct->flags & both) == both && (f->tcp_flags & MA_TCP_ACK))
		closed = 1;
	if (!closed)
		return;
	struct ma_auth_key ak = ct->auth_key;
	struct ma_ct_key key = *k;
	bpf_map_delete_elem(&ma_auth, &ak);
	bpf_map_delete_elem(&ma_conntrack, &key);
}

static __always_inline int hold(struct __sk_buff *skb, const struct flow *f, __u32 src_id, __u32 dst_id,
				__u8 direction, const struct ma_auth_key *ak, __u32 mark, __u8 flags)
{
	skb->mark = mark;
	count(direction, MA_REASON_AUTH_REQUIRED);
	emit(skb, f, MA_EV_HELD, MA_REASON_AUTH_REQUIRED, src_id, dst_id, direction, ak, flags);
	return TC_ACT_OK;
}

/* The common path after parsing. A packet of a tracked flow (a reply to a flow accepted in the
 * other direction, or a later packet of one accepted in this direction) passes on the fast
 * path while what justified the flow still holds; otherwise the flow is decided again, as a
 * new flow is: allowed, its entry is refreshed; not, the entry goes and the packet is dropped
 * with the reason. */
static __always_inline int enforce(struct __sk_buff *skb, struct flow *f, const struct ma_endpoint *ep,
				   __u8 direction)
{
	__u8 other = direction == MA_DIR_EGRESS ? MA_DIR_INGRESS : MA_DIR_EGRESS;
	/* The flow this packet would answer. For ICMP only an echo reply answers anything: the
	 * echo request (type 8) of the same id; any other type is a flow of its own. */
	struct flow rev = {
		.saddr = f->daddr,
		.daddr = f->saddr,
		.sport = f->dport,
		.dport = f->sport,
		.protocol = f->protocol,
		.icmp_type = MA_ICMP_ECHO,
	};
	struct ma_ct_key k = {};
	struct ma_ct_value *ct = 0;
	if (f->protocol != IPPROTO_ICMP || f->icmp_reply) {
		ct_key(&k, &rev, other);
		ct = bpf_map_lookup_elem(&ma_conntrack, &k);
	}
	int is_reply = ct != 0;
	if (!ct && !f->icmp_reply) {
		ct_key(&k, f, direction);
		ct = bpf_map_lookup_elem(&ma_conntrack, &k);
	}
	struct ma_config *cfg = config();
	__u64 now = bpf_ktime_get_boot_ns();
	/* The flow as it was accepted: a reply is judged as the flow it answers. */
	const struct flow *orig = is_reply ? &rev : f;
	__u8 orig_dir = is_reply ? other : direction;
	__u8 evf = 0;
	if (ct) {
		if (ct_valid(ct, ep, cfg, f->protocol, now)) {
			/* Coarse idle tracking: one write per second at most. */
			if (now - ct->last_seen_ns > 1000000000ULL)
				ct->last_seen_ns = now;
			if (f->protocol == IPPROTO_TCP &&
			    ct->auth_key.auth_type == MA_AUTH_PER_CONNECTION)
				per_connection_close(ct, &k, f, is_reply);
			count(direction, MA_STAT_FORWARDED);
			return TC_ACT_OK;
		}
		evf = MA_EVF_ESTABLISHED;
	}

	struct decision d = {};
	decide(orig, ep, orig_dir, &d);
	/* Identities as this packet travels. */
	__u32 src_id = is_reply ? d.dst_id : d.src_id;
	__u32 dst_id = is_reply ? d.src_id : d.dst_id;
	if (d.reason == MA_REASON_NONE) {
		ct_store(ct, orig, orig_dir, ep, cfg, &d.ak,
			 ct ? ct->flags & (MA_CT_FIN_ORIG | MA_CT_FIN_REPLY) : 0, now);
		count(direction, MA_STAT_FORWARDED);
		if (!ct)
			emit(skb, f, MA_EV_FORWARDED, MA_REASON_NONE, src_id, dst_id, direction, 0, 0);
		return TC_ACT_OK;
	}
	if (d.reason == MA_REASON_AUTH_REQUIRED && !is_reply && direction == MA_DIR_EGRESS &&
	    cfg && cfg->auth_miss_action == MA_AUTH_MISS_MARK) {
		/* Hold path, for what a pod sends only (a packet marked on its way into a pod would
		 * reach the pod: no node-side hook follows): a node-side rule queues marked packets
		 * until the pair is authenticated. The flow is tracked as held: its packets and
		 * replies pass only once the auth entry exists. */
		ct_store(ct, orig, orig_dir, ep, cfg, &d.ak, MA_CT_HELD, now);
		return hold(skb, f, src_id, dst_id, direction, &d.ak, cfg->hold_mark, evf);
	}
	if (ct && !(ct->flags & MA_CT_HELD))
		bpf_map_delete_elem(&ma_conntrack, &k);
	/* Two calls, not a conditional pointer: the verifier must see a stack pointer or none. */
	if (d.reason == MA_REASON_AUTH_REQUIRED)
		return drop(skb, f, d.reason, src_id, dst_id, direction, &d.ak, evf);
	return drop(skb, f, d.reason, src_id, dst_id, direction, 0, evf);
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct ma_endpoint *ep = bpf_map_lookup_elem(&ma_endpoints, &ifindex);
	if (!ep)
		return TC_ACT_OK; /* not a managed pod */
	struct flow f = {};
	int p = parse(skb, &f);
	if (p == 1)
		return TC_ACT_OK;
	if (p < 0) {
		count(MA_DIR_EGRESS, MA_REASON_UNSUPPORTED);
		return TC_ACT_SHOT;
	}
	if (f.saddr != ep->ipv4)
		return drop(skb, &f, MA_REASON_SPOOFED, ep->identity, 0, MA_DIR_EGRESS, 0, 0);
	return enforce(skb, &f, ep, MA_DIR_EGRESS);
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct ma_endpoint *ep = bpf_map_lookup_elem(&ma_endpoints, &ifindex);
	if (!ep)
		return TC_ACT_OK;
	struct flow f = {};
	int p = parse(skb, &f);
	if (p == 1)
		return TC_ACT_OK;
	if (p < 0) {
		count(MA_DIR_INGRESS, MA_REASON_UNSUPPORTED);
		return TC_ACT_SHOT;
	}
	/* Encryption on: what a pod of another node sends reaches this pod only out of the
	 * tunnel, whose device let it in only from that node's session (cryptokey routing). The
	 * same source address arriving any other way (plaintext on the underlay) is dropped. */
	struct ma_config *cfg = config();
	if (cfg && cfg->tunnel_ifindex != 0 && skb->ingress_ifindex != cfg->tunnel_ifindex) {
		struct ma_ipcache_value *src = ipcache_lookup(f.saddr);
		if (src && src->node_id != cfg->local_node && src->identity >= MA_FIRST_POD_IDENTITY &&
		    src->identity < MA_FIRST_LOCAL_IDENTITY)
			return drop(skb, &f, MA_REASON_UNENCRYPTED, src->identity, ep->identity,
				    MA_DIR_INGRESS, 0, 0);
	}
	return enforce(skb, &f, ep, MA_DIR_INGRESS);
}
