//! Access control: a service's `allow` and `deny` lists (xinetd's
//! `only_from`/`no_access`, nginx's `allow`/`deny`), checked by the worker
//! right after accept (or recvfrom), before the handler runs.
//!
//! Rules: an IP address (`"127.0.0.1"`, `"::1"`), a CIDR range
//! (`"10.0.0.0/8"`, `"2001:db8::/32"`), `"uid:N"` / `"uid:NAME"` and
//! `"gid:N"` / `"gid:NAME"` (Unix stream peers, by SO_PEERCRED), `"unix"`
//! (any Unix socket peer) and `"all"`. A peer is refused if a `deny` rule
//! matches; otherwise, if `allow` is not empty, it is refused unless an
//! `allow` rule matches. An IPv4-mapped IPv6 peer (`::ffff:10.0.0.1`, on a
//! dual-stack listener) is matched as the IPv4 address it is.
//!
//! Owns: nothing but the parsed rules.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use nix::unistd::{Group, User};

/// One entry of `allow` or `deny`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// An address range (a single address is a /32 or /128).
    Net(IpNet),
    /// A Unix peer running as this uid.
    Uid(u32),
    /// A Unix peer whose primary group is this gid.
    Gid(u32),
    /// Any Unix socket peer.
    Unix,
    /// Any peer.
    All,
}

/// Who is connecting, as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// An IP peer (canonical: an IPv4-mapped address as IPv4).
    Ip(IpAddr),
    /// A Unix peer, with its (uid, gid) when known (stream sockets).
    Unix(Option<(u32, u32)>),
}

/// A service's compiled lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Connections that match one of these are refused.
    pub deny: Vec<Rule>,
    /// If not empty, only connections that match one of these get in.
    pub allow: Vec<Rule>,
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal<'a> {
    /// This `deny` rule matched.
    Denied(&'a Rule),
    /// `allow` is not empty and no rule of it matched.
    NotAllowed,
}

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Denied(rule) => write!(f, "denied by {rule}"),
            Refusal::NotAllowed => f.write_str("not in allow"),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            Rule::Net(n) => write!(f, "{n}"),
            Rule::Uid(u) => write!(f, "uid:{u}"),
            Rule::Gid(g) => write!(f, "gid:{g}"),
            Rule::Unix => f.write_str("unix"),
            Rule::All => f.write_str("all"),
        }
    }
}

const EXPECTED: &str = "expected an IP address (\"127.0.0.1\", \"::1\"), a CIDR range (\"10.0.0.0/8\", \"2001:db8::/32\"), \"uid:N\", \"gid:N\", \"unix\" or \"all\"";

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        match s {
            "all" => return Ok(Rule::All),
            "unix" => return Ok(Rule::Unix),
            _ => {}
        }
        if let Some(who) = s.strip_prefix("uid:") {
            return id(who, "uid", |n| {
                User::from_name(n).ok().flatten().map(|u| u.uid.as_raw())
            })
            .map(Rule::Uid);
        }
        if let Some(who) = s.strip_prefix("gid:") {
            return id(who, "gid", |n| {
                Group::from_name(n).ok().flatten().map(|g| g.gid.as_raw())
            })
            .map(Rule::Gid);
        }
        if s.contains('/') {
            let net =
                IpNet::from_str(s).map_err(|_| format!("invalid address {s:?}: {EXPECTED}"))?;
            if net.trunc() != net {
                return Err(format!(
                    "{s:?} has bits set past its /{} prefix: did you mean \"{}\"?",
                    net.prefix_len(),
                    net.trunc()
                ));
            }
            return Ok(Rule::Net(canonical_net(net)));
        }
        let ip = IpAddr::from_str(s).map_err(|_| format!("invalid address {s:?}: {EXPECTED}"))?;
        Ok(Rule::Net(canonical_net(IpNet::from(ip))))
    }
}

/// A uid or gid, as a number or a name looked up now.
fn id(who: &str, what: &str, lookup: impl Fn(&str) -> Option<u32>) -> Result<u32, String> {
    if who.is_empty() {
        return Err(format!(
            "{what}: needs a number or a name, such as \"{what}:1000\""
        ));
    }
    if let Ok(n) = who.parse::<u32>() {
        return Ok(n);
    }
    lookup(who).ok_or_else(|| {
        format!(
            "{what}:{who}: no such {}: expected a number or an existing name",
            if what == "uid" { "user" } else { "group" }
        )
    })
}

/// An IPv6 range inside `::ffff:0:0/96` is the IPv4 range it maps.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

impl Rule {
    fn matches(&self, peer: &Peer) -> bool {
        match (self, peer) {
            (Rule::All, _) => true,
            (Rule::Net(net), Peer::Ip(ip)) => net.contains(&ip.to_canonical()),
            (Rule::Unix, Peer::Unix(_)) => true,
            (Rule::Uid(u), Peer::Unix(Some((uid, _)))) => u == uid,
            (Rule::Gid(g), Peer::Unix(Some((_, gid)))) => g == gid,
            _ => false,
        }
    }

    fn needs_credentials(&self) -> bool {
        matches!(self, Rule::Uid(_) | Rule::Gid(_))
    }
}

impl Acl {
    /// Compiles the lists; an error names the entry (its index in `allow`
    /// or `deny`) and what is wrong with it.
    pub fn parse<'a>(
        allow: impl IntoIterator<Item = &'a str>,
        deny: impl IntoIterator<Item = &'a str>,
    ) -> Result<Acl, (bool, usize, String)> {
        let compile = |list: Vec<&'a str>, is_allow: bool| {
            list.into_iter()
                .enumerate()
                .map(|(i, s)| s.parse::<Rule>().map_err(|e| (is_allow, i, e)))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Acl {
            allow: compile(allow.into_iter().collect(), true)?,
            deny: compile(deny.into_iter().collect(), false)?,
        })
    }

    /// True when there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a rule needs a Unix peer's credentials (SO_PEERCRED).
    pub fn needs_credentials(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(Rule::needs_credentials)
    }

    /// Ok if `peer` may connect, else why not.
    pub fn check(&self, peer: &Peer) -> Result<(), Refusal<'_>> {
        if let Some(rule) = self.deny.iter().find(|r| r.matches(peer)) {
            return Err(Refusal::Denied(rule));
        }
        if self.allow.is_empty() || self.allow.iter().any(|r| r.matches(peer)) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        Acl::parse(allow.iter().copied(), deny.iter().copied()).unwrap()
    }

    fn ip(s: &str) -> Peer {
        Peer::Ip(s.parse().unwrap())
    }

    #[test]
    fn deny_wins_then_allow_must_match() {
        let a = acl(&["127.0.0.0/8", "::1"], &["127.0.0.2"]);
        assert_eq!(a.check(&ip("127.0.0.1")), Ok(()));
        assert_eq!(a.check(&ip("::1")), Ok(()));
        assert_eq!(
            a.check(&ip("127.0.0.2")).unwrap_err().to_string(),
            "denied by 127.0.0.2"
        );
        assert_eq!(a.check(&ip("10.0.0.1")), Err(Refusal::NotAllowed));
        assert_eq!(a.check(&ip("::2")), Err(Refusal::NotAllowed));
        // No list: everyone; deny only: everyone else.
        assert_eq!(acl(&[], &[]).check(&ip("10.0.0.1")), Ok(()));
        let d = acl(&[], &["10.0.0.0/8"]);
        assert!(d.check(&ip("10.9.9.9")).is_err());
        assert_eq!(d.check(&ip("11.0.0.1")), Ok(()));
        assert!(acl(&["::1"], &["all"]).check(&ip("::1")).is_err());
    }

    #[test]
    fn ipv4_mapped_peers_and_rules_are_ipv4() {
        let a = acl(&["10.0.0.0/8"], &[]);
        assert_eq!(a.check(&ip("::ffff:10.1.2.3")), Ok(()));
        let m = acl(&["::ffff:192.168.0.0/112"], &[]);
        assert_eq!(m.allow, vec![Rule::Net("192.168.0.0/16".parse().unwrap())]);
        assert_eq!(m.check(&ip("192.168.4.4")), Ok(()));
        let v6 = acl(&["2001:db8::/32"], &[]);
        assert_eq!(v6.check(&ip("2001:db8:1::5")), Ok(()));
        assert!(v6.check(&ip("2001:db9::5")).is_err());
    }

    #[test]
    fn unix_peers_by_uid_gid_or_any() {
        let a = acl(&["uid:1000", "gid:100"], &["uid:0"]);
        assert!(a.needs_credentials());
        assert_eq!(a.check(&Peer::Unix(Some((1000, 5)))), Ok(()));
        assert_eq!(a.check(&Peer::Unix(Some((7, 100)))), Ok(()));
        assert!(a.check(&Peer::Unix(Some((0, 100)))).is_err());
        assert!(a.check(&Peer::Unix(Some((7, 7)))).is_err());
        assert!(a.check(&Peer::Unix(None)).is_err(), "unknown credentials");
        assert!(a.check(&ip("127.0.0.1")).is_err());
        let u = acl(&["unix"], &[]);
        assert!(!u.needs_credentials());
        assert_eq!(u.check(&Peer::Unix(None)), Ok(()));
        assert!(u.check(&ip("127.0.0.1")).is_err());
        assert_eq!(acl(&["uid:root"], &[]).allow, vec![Rule::Uid(0)]);
    }

    #[test]
    fn bad_entries_say_what_is_expected() {
        let err = |s: &str| s.parse::<Rule>().unwrap_err();
        assert!(
            err("10.0.0.300").contains("expected an IP address"),
            "{}",
            err("10.0.0.300")
        );
        assert!(err("10.0.0.0/33").contains("CIDR range"));
        assert!(err("localhost").contains("invalid address \"localhost\""));
        assert_eq!(
            err("10.0.0.1/8"),
            "\"10.0.0.1/8\" has bits set past its /8 prefix: did you mean \"10.0.0.0/8\"?"
        );
        assert!(err("uid:").contains("needs a number or a name"));
        assert!(err("uid:no-such-user-here").contains("no such user"));
        assert!(err("gid:no-such-group-here").contains("no such group"));
        let e = Acl::parse(["::1"], ["1.2.3.4", "nope"]).unwrap_err();
        assert_eq!((e.0, e.1), (false, 1));
    }
}
