//! Membership from a TOML file, reloaded when it changes.
//!
//! ```toml
//! [[member]]
//! addr = "1.1.1"
//! net_addr = "127.0.0.1:9001"
//! export = false      # optional, default false
//! available = true    # optional, default true
//! ```
//!
//! The file is polled (default every second) rather than watched through the OS: polling works
//! the same on every filesystem, container volume and editor's save strategy, and costs one
//! small read per interval. A file that fails to parse on reload is reported as an error item
//! and the last good membership stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::watch::{self as level, State};
use super::{Discovery, Member, MembershipStream};
use crate::error::DiscoveryError;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    member: Vec<StrictMember>,
}

/// A member as written by hand: a misspelled field (`exported = true`) is an error here, not
/// silently ignored. (Values in etcd stay lenient, so a newer writer's extra field never makes
/// an older node skip a member.)
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictMember {
    addr: crate::addr::LogicAddr,
    net_addr: String,
    #[serde(default)]
    export: bool,
    #[serde(default = "yes")]
    available: bool,
}

fn yes() -> bool {
    true
}

impl From<StrictMember> for Member {
    fn from(m: StrictMember) -> Member {
        Member::new(m.addr, m.net_addr)
            .with_export(m.export)
            .with_available(m.available)
    }
}

impl From<&Member> for StrictMember {
    fn from(m: &Member) -> StrictMember {
        StrictMember {
            addr: m.addr,
            net_addr: m.net_addr.clone(),
            export: m.export,
            available: m.available,
        }
    }
}

/// Parses the membership TOML format; duplicate addresses are an error.
pub fn parse_members(text: &str, source_name: &str) -> Result<Vec<Member>, DiscoveryError> {
    let doc: Document = toml::from_str(text).map_err(|e| DiscoveryError::Malformed {
        source_name: source_name.into(),
        reason: e.to_string(),
    })?;
    let members: Vec<Member> = doc.member.into_iter().map(Member::from).collect();
    let mut seen = std::collections::HashSet::new();
    for m in &members {
        if !seen.insert(m.addr) {
            return Err(DiscoveryError::Malformed {
                source_name: source_name.into(),
                reason: format!("member {} is listed twice", m.addr),
            });
        }
        if m.net_addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(DiscoveryError::Malformed {
                source_name: source_name.into(),
                reason: format!(
                    "member {}: net_addr {:?} is not host:port",
                    m.addr, m.net_addr
                ),
            });
        }
    }
    Ok(members)
}

/// Writes members in the format [`parse_members`] reads.
pub fn format_members(members: &[Member]) -> String {
    let doc = Document {
        member: members.iter().map(StrictMember::from).collect(),
    };
    // Serialising plain strings and bools cannot fail.
    toml::to_string(&doc).expect("membership serialises")
}

/// Membership read from a TOML file and reloaded when its content changes.
#[derive(Debug, Clone)]
pub struct FileDiscovery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    poll: Duration,
    tx: watch::Sender<State>,
    last_text: Mutex<String>,
    polling: Mutex<bool>,
}

fn read(path: &Path) -> Result<String, DiscoveryError> {
    std::fs::read_to_string(path).map_err(|e| DiscoveryError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

impl FileDiscovery {
    /// Reads `path` now (a missing or malformed file is an error here) and polls it every
    /// second while anyone is subscribed.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, DiscoveryError> {
        Self::open_with_interval(path, Duration::from_secs(1))
    }

    /// Like [`FileDiscovery::open`], polling every `poll`.
    pub fn open_with_interval(
        path: impl Into<PathBuf>,
        poll: Duration,
    ) -> Result<Self, DiscoveryError> {
        let path = path.into();
        let text = read(&path)?;
        let members = parse_members(&text, &path.display().to_string())?;
        let map: BTreeMap<_, _> = members.into_iter().map(|m| (m.addr, m)).collect();
        let (tx, _) = watch::channel(State {
            members: Arc::new(map),
            error: None,
        });
        Ok(FileDiscovery {
            inner: Arc::new(Inner {
                path,
                poll,
                tx,
                last_text: Mutex::new(text),
                polling: Mutex::new(false),
            }),
        })
    }

    /// Reads the file again now; returns whether the membership changed.
    pub fn reload(&self) -> Result<bool, DiscoveryError> {
        self.inner.reload()
    }
}

impl Inner {
    fn reload(&self) -> Result<bool, DiscoveryError> {
        let text = read(&self.path)?;
        let mut last = self.last_text.lock().unwrap_or_else(|e| e.into_inner());
        if *last == text {
            return Ok(false);
        }
        let members = parse_members(&text, &self.path.display().to_string())?;
        *last = text;
        let map: BTreeMap<_, _> = members.into_iter().map(|m| (m.addr, m)).collect();
        let mut changed = false;
        self.tx.send_if_modified(|s| {
            if *s.members != map {
                s.members = Arc::new(map);
                changed = true;
            }
            changed
        });
        Ok(changed)
    }

    fn report(&self, error: DiscoveryError) {
        tracing::warn!(path = %self.path.display(), %error, "membership file not reloaded; keeping the last good membership");
        self.tx.send_modify(|s| {
            let n = s.error.as_ref().map_or(1, |(n, _)| n + 1);
            s.error = Some((n, error));
        });
    }

    async fn poll_loop(self: Arc<Self>) {
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = self.tx.closed() => {
                    // Decide under the lock `subscribe` takes after creating its receiver:
                    // either it sees the loop running, or the loop sees its receiver.
                    let mut polling = self.polling.lock().unwrap_or_else(|e| e.into_inner());
                    if self.tx.receiver_count() == 0 {
                        *polling = false;
                        return;
                    }
                    continue;
                }
                _ = tokio::time::sleep(self.poll) => {}
            }
            match self.reload() {
                Ok(_) => last_error = None,
                Err(e) => {
                    // Report a failure once, not on every poll.
                    if last_error.as_deref() != Some(&e.to_string()) {
                        last_error = Some(e.to_string());
                        self.report(e);
                    }
                }
            }
        }
    }
}

impl Discovery for FileDiscovery {
    fn subscribe(&self) -> MembershipStream {
        let rx = self.inner.tx.subscribe();
        let mut polling = self.inner.polling.lock().unwrap_or_else(|e| e.into_inner());
        if !*polling {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                *polling = true;
                rt.spawn(self.inner.clone().poll_loop());
            } else {
                tracing::warn!(path = %self.inner.path.display(), "subscribed outside a tokio runtime; the membership file will not be reloaded");
            }
        }
        level::stream(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MembershipEvent;
    use tokio_stream::StreamExt;

    #[test]
    fn parse_and_format_round_trip() {
        let text = r#"
            [[member]]
            addr = "1.1.1"
            net_addr = "127.0.0.1:9001"
            [[member]]
            addr = "1.255.1"
            net_addr = "127.0.0.1:9002"
            export = true
            available = false
        "#;
        let members = parse_members(text, "t").unwrap();
        assert_eq!(members.len(), 2);
        assert!(members[1].addr.is_harbor() && members[1].export && !members[1].available);
        assert!(members[0].available && !members[0].export);
        assert_eq!(
            parse_members(&format_members(&members), "t").unwrap(),
            members
        );
    }

    #[test]
    fn malformed_files_name_the_cause() {
        let dup = "[[member]]\naddr=\"1.1.1\"\nnet_addr=\"a:1\"\n[[member]]\naddr=\"1.1.1\"\nnet_addr=\"a:2\"\n";
        assert!(
            parse_members(dup, "f")
                .unwrap_err()
                .to_string()
                .contains("1.1.1 is listed twice")
        );
        let bad_addr = "[[member]]\naddr=\"0.1.1\"\nnet_addr=\"a:1\"\n";
        assert!(
            parse_members(bad_addr, "f")
                .unwrap_err()
                .to_string()
                .contains("cluster 0")
        );
        let typo = "[[member]]\naddr=\"1.1.1\"\nnet_addr=\"a:1\"\nexported=true\n";
        assert!(
            parse_members(typo, "f")
                .unwrap_err()
                .to_string()
                .contains("unknown field `exported`")
        );
        let bad_net = "[[member]]\naddr=\"1.1.1\"\nnet_addr=\"nowhere\"\n";
        assert!(
            parse_members(bad_net, "f")
                .unwrap_err()
                .to_string()
                .contains("not host:port")
        );
    }

    #[tokio::test]
    async fn reloads_when_the_file_changes() {
        let dir = std::env::temp_dir().join(format!(
            "cg-file-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("members.toml");
        std::fs::write(
            &path,
            "[[member]]\naddr=\"1.1.1\"\nnet_addr=\"127.0.0.1:1\"\n",
        )
        .unwrap();
        let d = FileDiscovery::open_with_interval(&path, Duration::from_millis(20)).unwrap();
        let mut s = d.subscribe();
        let MembershipEvent::Snapshot(first) = s.next().await.unwrap().unwrap() else {
            panic!("first item must be a snapshot")
        };
        assert_eq!(first.len(), 1);
        std::fs::write(&path, "[[member]]\naddr=\"1.1.1\"\nnet_addr=\"127.0.0.1:1\"\n[[member]]\naddr=\"1.1.2\"\nnet_addr=\"127.0.0.1:2\"\n").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(next, MembershipEvent::Upsert(m) if m.addr.to_string() == "1.1.2"));
        // A broken file is reported and the last good membership stays.
        std::fs::write(&path, "this is not toml [").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap();
        assert!(next.is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
