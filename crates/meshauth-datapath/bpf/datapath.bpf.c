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
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct ma_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct ma_ipcache_key);
	__type(value, struct ma_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct ma_policy_key);
	__type(value, struct ma_policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ma_auth_key);
	__type(value, struct ma_auth_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_auth SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
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

/* Per-CPU counters: [0..MA_REASON_COUNT) drops by reason, then forwarded, then events lost. */
#define MA_STAT_FORWARDED MA_REASON_COUNT
#define MA_STAT_EVENTS_LOST (MA_REASON_COUNT + 1)
#define MA_STAT_COUNT (MA_REASON_COUNT + 2)

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MA_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ma_stats SEC(".maps");

/* The ICMP header fields this program reads (linux/icmp.h pulls in libc headers). */
#define MA_ICMP_ECHOREPLY 0
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
};

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&ma_stats, &stat);
	if (v)
		*v += 1;
}

static __always_inline void emit(struct __sk_buff *skb, const struct flow *f, __u8 verdict,
				 __u8 reason, __u32 src_id, __u32 dst_id, __u8 direction,
				 const struct ma_auth_key *auth_key)
{
	__u32 zero = 0;
	struct ma_config *cfg = bpf_map_lookup_elem(&ma_config, &zero);
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
		count(MA_STAT_EVENTS_LOST);
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
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct ma_icmphdr *icmp = l4;
		if ((void *)(icmp + 1) > end)
			return -1;
		/* Echo id serves as both ports so that request and reply match in conntrack. */
		f->sport = bpf_ntohs(icmp->id);
		f->dport = f->sport;
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

/* Looks up policy with wildcards: deny anywhere wins, else the strongest allow. Returns the
 * verdict (0 when nothing matched) and the auth type through *auth. */
static __always_inline __u8 policy_lookup(__u32 endpoint_id, __u8 direction, __u32 remote,
					  const struct flow *f, __u8 *auth)
{
	__u8 verdict = 0;
	*auth = MA_AUTH_NONE;
	__u16 port = (f->protocol == IPPROTO_ICMP) ? 0 : f->dport;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		struct ma_policy_key k = {
			.prefixlen = 96,
			.endpoint_id = endpoint_id,
			.remote_identity = (i & 1) ? 0 : remote,
			.direction = direction,
			.protocol = (i & 2) ? 0 : f->protocol,
			.dport = bpf_htons(port),
		};
		struct ma_policy_value *v = bpf_map_lookup_elem(&ma_policy, &k);
		if (!v)
			continue;
		if (v->verdict == MA_VERDICT_DENY)
			return MA_VERDICT_DENY;
		if (v->verdict == MA_VERDICT_ALLOW) {
			verdict = MA_VERDICT_ALLOW;
			if (v->auth_type > *auth)
				*auth = v->auth_type;
		}
	}
	return verdict;
}

static __always_inline int drop(struct __sk_buff *skb, const struct flow *f, __u8 reason,
				__u32 src_id, __u32 dst_id, __u8 direction,
				const struct ma_auth_key *auth_key)
{
	count(reason);
	emit(skb, f, MA_EV_DROPPED, reason, src_id, dst_id, direction, auth_key);
	return TC_ACT_SHOT;
}

static __always_inline struct ma_ct_value *ct_lookup(const struct flow *f, __u8 direction)
{
	struct ma_ct_key k = {
		.saddr = f->saddr,
		.daddr = f->daddr,
		.sport = f->sport,
		.dport = f->dport,
		.protocol = f->protocol,
		.direction = direction,
	};
	struct ma_ct_value *v = bpf_map_lookup_elem(&ma_conntrack, &k);
	if (v)
		v->last_seen_ns = bpf_ktime_get_boot_ns();
	return v;
}

/* A reply: the reverse tuple was accepted in `direction`. */
static __always_inline struct ma_ct_value *ct_reply(const struct flow *f, __u8 direction)
{
	struct flow r = {
		.saddr = f->daddr,
		.daddr = f->saddr,
		.sport = f->dport,
		.dport = f->sport,
		.protocol = f->protocol,
	};
	return ct_lookup(&r, direction);
}

static __always_inline void ct_create(const struct flow *f, __u8 direction, const struct ma_auth_key *held)
{
	struct ma_ct_key k = {
		.saddr = f->saddr,
		.daddr = f->daddr,
		.sport = f->sport,
		.dport = f->dport,
		.protocol = f->protocol,
		.direction = direction,
	};
	__u64 now = bpf_ktime_get_boot_ns();
	struct ma_ct_value v = { .created_ns = now, .last_seen_ns = now };
	if (held) {
		v.auth_key = *held;
		v.flags = MA_CT_HELD;
	}
	bpf_map_update_elem(&ma_conntrack, &k, &v, BPF_ANY);
}

static __always_inline int authenticated(const struct ma_auth_key *k)
{
	struct ma_auth_value *av = bpf_map_lookup_elem(&ma_auth, k);
	return av && av->expires_ns > bpf_ktime_get_boot_ns();
}

static __always_inline int hold(struct __sk_buff *skb, const struct flow *f, __u32 src_id, __u32 dst_id,
				__u8 direction, const struct ma_auth_key *ak, __u32 mark)
{
	skb->mark = mark;
	count(MA_REASON_AUTH_REQUIRED);
	emit(skb, f, MA_EV_DROPPED, MA_REASON_AUTH_REQUIRED, src_id, dst_id, direction, ak);
	return TC_ACT_OK;
}

/* The common path after parsing: conntrack, identity, policy, auth. */
static __always_inline int enforce(struct __sk_buff *skb, struct flow *f, const struct ma_endpoint *ep,
				   __u8 direction)
{
	/* Replies of flows this endpoint accepted in the other direction, and established flows. */
	__u8 other = direction == MA_DIR_EGRESS ? MA_DIR_INGRESS : MA_DIR_EGRESS;
	struct ma_ct_value *reply = ct_reply(f, other);
	struct ma_ct_value *est = 0;
	if (!reply && !f->icmp_reply)
		est = ct_lookup(f, direction);
	struct ma_ct_value *ct = reply ? reply : est;
	if (ct) {
		if (!(ct->flags & MA_CT_HELD)) {
			count(MA_STAT_FORWARDED);
			return TC_ACT_OK;
		}
		/* A held flow passes once its pair has authenticated. */
		struct ma_auth_key held = ct->auth_key;
		if (authenticated(&held)) {
			ct->flags = 0;
			count(MA_STAT_FORWARDED);
			return TC_ACT_OK;
		}
		__u32 zero = 0;
		struct ma_config *cfg = bpf_map_lookup_elem(&ma_config, &zero);
		if (est && cfg && cfg->auth_miss_action == MA_AUTH_MISS_MARK)
			return hold(skb, f, 0, 0, direction, &held, cfg->hold_mark);
		return drop(skb, f, MA_REASON_AUTH_REQUIRED, 0, 0, direction, &held);
	}
	__u32 remote_addr = direction == MA_DIR_EGRESS ? f->daddr : f->saddr;
	struct ma_ipcache_value *remote = ipcache_lookup(remote_addr);
	__u32 src_id = direction == MA_DIR_EGRESS ? ep->identity : 0;
	__u32 dst_id = direction == MA_DIR_EGRESS ? 0 : ep->identity;
	if (!remote)
		return drop(skb, f, MA_REASON_NO_IDENTITY, src_id, dst_id, direction, 0);
	__u32 remote_id = remote->identity;
	__u32 remote_node = remote->node_id;
	if (direction == MA_DIR_EGRESS)
		dst_id = remote_id;
	else
		src_id = remote_id;

	__u8 auth = MA_AUTH_NONE;
	__u8 verdict = policy_lookup(ep->endpoint_id, direction, remote_id, f, &auth);
	if (verdict != MA_VERDICT_ALLOW)
		return drop(skb, f, MA_REASON_POLICY_DENIED, src_id, dst_id, direction, 0);

	if (auth != MA_AUTH_NONE) {
		struct ma_auth_key ak = {
			.local_identity = ep->identity,
			.remote_identity = remote_id,
			.remote_node = remote_node,
			.auth_type = auth,
		};
		if (!authenticated(&ak)) {
			__u32 zero = 0;
			struct ma_config *cfg = bpf_map_lookup_elem(&ma_config, &zero);
			if (cfg && cfg->auth_miss_action == MA_AUTH_MISS_MARK) {
				/* Hold path: a node-side rule queues marked packets until the pair is
				 * authenticated. The flow is tracked as held: its packets and replies
				 * pass only once the auth entry exists. */
				ct_create(f, direction, &ak);
				return hold(skb, f, src_id, dst_id, direction, &ak, cfg->hold_mark);
			}
			return drop(skb, f, MA_REASON_AUTH_REQUIRED, src_id, dst_id, direction, &ak);
		}
	}

	ct_create(f, direction, 0);
	count(MA_STAT_FORWARDED);
	emit(skb, f, MA_EV_FORWARDED, MA_REASON_NONE, src_id, dst_id, direction, 0);
	return TC_ACT_OK;
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
		count(MA_REASON_UNSUPPORTED);
		return TC_ACT_SHOT;
	}
	if (f.saddr != ep->ipv4)
		return drop(skb, &f, MA_REASON_SPOOFED, ep->identity, 0, MA_DIR_EGRESS, 0);
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
		count(MA_REASON_UNSUPPORTED);
		return TC_ACT_SHOT;
	}
	return enforce(skb, &f, ep, MA_DIR_INGRESS);
}
