//! The etcd side of the commands.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use clustergo::DrainProgress;
use clustergo::membership::{alive_key, read_prefix};
use clustergo::membership::{encode_member, format_members, member_key, parse_members};
use clustergo::route;
use clustergo::{LogicAddr, Member};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

pub(crate) struct Store {
    client: Client,
    prefix: String,
    endpoints: String,
    timeout: Duration,
}

/// A member as listed: its configuration and whether its node holds a lease.
struct Listed {
    member: Member,
    alive: bool,
}

impl Store {
    pub(crate) async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Store, String> {
        let joined = endpoints.join(",");
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, None))
            .await
            .map_err(|_| format!("cannot reach etcd at {joined}: timed out after {timeout:?}"))?
            .map_err(|e| format!("cannot reach etcd at {joined}: {e}"))?;
        Ok(Store {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            endpoints: joined,
            timeout,
        })
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| {
                format!(
                    "etcd at {} did not answer within {:?}",
                    self.endpoints, self.timeout
                )
            })?
            .map_err(|e| format!("etcd at {}: {e}", self.endpoints))
    }

    /// Every member (malformed values reported on stderr and skipped) with its liveness.
    ///
    /// Read as nodes read it ([`read_prefix`]: in pages at one revision), since one read of
    /// a large membership would exceed the 4 MiB a gRPC client accepts in one message.
    async fn load(&mut self) -> Result<Vec<Listed>, String> {
        let mut kv = self.client.clone();
        let members_dir = format!("{}/members/", self.prefix);
        let alive_dir = format!("{}/alive/", self.prefix);
        let mut members = Vec::new();
        let mut alive = std::collections::HashSet::new();
        read_prefix(&mut kv, &self.prefix, self.timeout, |key, value| {
            let key = String::from_utf8_lossy(key);
            if let Some(addr) = key.strip_prefix(&members_dir) {
                match serde_json::from_slice::<Member>(value) {
                    Ok(m) if m.addr.to_string() == addr => members.push(m),
                    Ok(m) => eprintln!("clusterctl: skipping {key}: its value names {}", m.addr),
                    Err(e) => eprintln!("clusterctl: skipping {key}: malformed value: {e}"),
                }
            } else if let Some(addr) = key.strip_prefix(&alive_dir) {
                alive.insert(addr.to_owned());
            }
        })
        .await
        .map_err(|e| format!("etcd at {}: {e}", self.endpoints))?;
        members.sort_by_key(|m| m.addr);
        Ok(members
            .into_iter()
            .map(|m| Listed {
                alive: alive.contains(&m.addr.to_string()),
                member: m,
            })
            .collect())
    }

    /// A member and the revision its value was last written at.
    async fn get(&mut self, addr: LogicAddr) -> Result<(Member, i64), String> {
        let mut kv = self.client.clone();
        let resp = self
            .timed(kv.get(member_key(&self.prefix, addr), None))
            .await?;
        let value = resp
            .kvs()
            .first()
            .ok_or_else(|| format!("member {addr} is not listed under {}", self.prefix))?;
        let m: Member = serde_json::from_slice(value.value())
            .map_err(|e| format!("member {addr} has a malformed value in etcd: {e}"))?;
        if m.addr != addr {
            return Err(format!(
                "member {addr} has a malformed value in etcd: it names {}; remove and add it again",
                m.addr
            ));
        }
        Ok((m, value.mod_revision()))
    }

    /// Writes `m`; an entry that exists keeps its lease (a claimed member stays claimed: its
    /// id is freed when its node's lease ends, not made permanent by an import).
    async fn put(&mut self, m: &Member) -> Result<(), String> {
        let key = member_key(&self.prefix, m.addr);
        let value = encode_member(m);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_ignore_lease()),
            )])
            .or_else([TxnOp::put(key, value, None)]);
        let mut kv = self.client.clone();
        self.timed(kv.txn(txn)).await.map(|_| ())
    }

    /// Sets `available` over the value just read (keeping a claimed member's lease); returns
    /// the revision of the write.
    async fn set_available(&mut self, addr: LogicAddr, available: bool) -> Result<i64, String> {
        let (mut m, revision) = self.get(addr).await?;
        m.available = available;
        self.write_over(&m, revision).await
    }

    /// Writes `m` only over the value read at `revision` (a concurrent change is reported, not
    /// overwritten), keeping the entry's lease (a claimed member stays claimed); returns the
    /// revision of the write.
    async fn write_over(&mut self, m: &Member, revision: i64) -> Result<i64, String> {
        let key = member_key(&self.prefix, m.addr);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(
                key,
                encode_member(m),
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        let mut kv = self.client.clone();
        let resp = self.timed(kv.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(format!(
                "member {} changed while this command ran (or was removed); run it again",
                m.addr
            ));
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Marks `addr` unavailable, then waits (printing each change of its figures) until the
    /// node reports it is idle, stops, or `deadline` passes.
    pub(crate) async fn drain(
        &mut self,
        addr: LogicAddr,
        deadline: Duration,
    ) -> Result<String, String> {
        let started = tokio::time::Instant::now();
        let written = self.set_available(addr, false).await?;
        println!("{addr} marked unavailable: gateways and get_addr_by_type stop picking it");
        let mut last: Option<DrainProgress> = None;
        let mut waiting_said = false;
        loop {
            let mut kv = self.client.clone();
            let resp = self
                .timed(kv.get(alive_key(&self.prefix, addr), None))
                .await?;
            let Some(alive) = resp.kvs().first() else {
                return Ok(format!(
                    "{addr} is not running (no alive key): nothing left to wait for ({:.1} s)\n",
                    started.elapsed().as_secs_f64()
                ));
            };
            // Only what the node wrote after this drain counts.
            let progress = (alive.mod_revision() > written)
                .then(|| DrainProgress::from_json(alive.value()))
                .flatten();
            match progress {
                Some(p) if p.is_idle() => {
                    return Ok(format!(
                        "{addr} drained: idle after {:.1} s (stop it now; `clusterctl undrain {addr}` once it runs again)\n",
                        started.elapsed().as_secs_f64()
                    ));
                }
                Some(p) if last != Some(p) => {
                    println!(
                        "draining {addr}: {} streams (clients), {} calls in flight ({:.0} s left)",
                        p.streams,
                        p.calls,
                        deadline.saturating_sub(started.elapsed()).as_secs_f64()
                    );
                    last = Some(p);
                }
                Some(_) => {}
                None if !waiting_said && started.elapsed() > Duration::from_secs(2) => {
                    println!("waiting for {addr} to report its drain");
                    waiting_said = true;
                }
                None => {}
            }
            if started.elapsed() >= deadline {
                let left = match last {
                    Some(p) => format!("{} streams, {} calls in flight", p.streams, p.calls),
                    None => "it never reported its drain".into(),
                };
                return Err(format!(
                    "{addr} not idle after {} s: {left}; it stays unavailable",
                    deadline.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Marks `addr` available again.
    pub(crate) async fn undrain(&mut self, addr: LogicAddr) -> Result<String, String> {
        self.set_available(addr, true).await?;
        Ok(format!("{addr} available again\n"))
    }

    pub(crate) async fn list(&mut self) -> Result<String, String> {
        let listed = self.load().await?;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<14} {:<24} {:<7} {:<10} {:<5}",
            "ADDRESS", "NET ADDRESS", "EXPORT", "AVAILABLE", "ALIVE"
        );
        for l in &listed {
            let m = &l.member;
            let yes = |b: bool| if b { "yes" } else { "no" };
            let _ = writeln!(
                out,
                "{:<14} {:<24} {:<7} {:<10} {:<5}",
                m.addr.to_string(),
                m.net_addr,
                yes(m.export),
                yes(m.available),
                yes(l.alive)
            );
        }
        Ok(out)
    }

    pub(crate) async fn add(
        &mut self,
        addr: LogicAddr,
        net_addr: String,
        export: bool,
        available: bool,
    ) -> Result<String, String> {
        check_net_addr(&net_addr)?;
        let m = Member::new(addr, net_addr)
            .with_export(export)
            .with_available(available);
        let key = member_key(&self.prefix, addr);
        // Only if absent: two operators adding the same address cannot overwrite each other.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, encode_member(&m), None)]);
        let mut kv = self.client.clone();
        let resp = self.timed(kv.txn(txn)).await?;
        if !resp.succeeded() {
            return Err(format!(
                "member {addr} is already listed; use `members update`"
            ));
        }
        Ok(format!("added {addr} at {}\n", m.net_addr))
    }

    pub(crate) async fn update(
        &mut self,
        addr: LogicAddr,
        net_addr: Option<String>,
        export: Option<bool>,
        available: Option<bool>,
    ) -> Result<String, String> {
        let (mut m, revision) = self.get(addr).await?;
        if let Some(n) = net_addr {
            check_net_addr(&n)?;
            m.net_addr = n;
        }
        if let Some(e) = export {
            m.export = e;
        }
        if let Some(a) = available {
            m.available = a;
        }
        self.write_over(&m, revision).await?;
        Ok(format!(
            "updated {addr}: net_addr {}, export {}, available {}\n",
            m.net_addr, m.export, m.available
        ))
    }

    pub(crate) async fn remove(&mut self, addr: LogicAddr) -> Result<String, String> {
        let mut kv = self.client.clone();
        let resp = self
            .timed(kv.delete(member_key(&self.prefix, addr), None))
            .await?;
        if resp.deleted() == 0 {
            return Err(format!("member {addr} is not listed under {}", self.prefix));
        }
        Ok(format!("removed {addr}\n"))
    }

    pub(crate) async fn import(&mut self, file: &Path) -> Result<String, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let members =
            parse_members(&text, &file.display().to_string()).map_err(|e| e.to_string())?;
        for m in &members {
            self.put(m).await?;
        }
        Ok(format!(
            "imported {} members from {}\n",
            members.len(),
            file.display()
        ))
    }

    pub(crate) async fn export(&mut self, file: Option<&Path>) -> Result<String, String> {
        let members: Vec<Member> = self.load().await?.into_iter().map(|l| l.member).collect();
        let text = format_members(&members);
        match file {
            None => Ok(text),
            Some(f) => {
                std::fs::write(f, text)
                    .map_err(|e| format!("cannot write {}: {e}", f.display()))?;
                Ok(format!(
                    "exported {} members to {}\n",
                    members.len(),
                    f.display()
                ))
            }
        }
    }

    pub(crate) async fn route(&mut self, from: LogicAddr, to: LogicAddr) -> Result<String, String> {
        let members: Vec<Member> = self
            .load()
            .await?
            .into_iter()
            .map(|l| {
                let alive = l.alive;
                let m = l.member;
                let available = m.available && alive;
                m.with_available(available)
            })
            .collect();
        let hops = route::route(from, to, &members)?;
        let mut out = String::new();
        let kind = match hops.len() {
            1 if from == to => "local",
            1 => "direct",
            _ => "through harbors",
        };
        let _ = writeln!(out, "route {from} -> {to}: {kind}");
        for (i, hop) in hops.iter().enumerate() {
            let _ = writeln!(out, "  {}. {hop}", i + 1);
        }
        if from.cluster() != to.cluster() && !members.iter().any(|m| m.addr == to && m.export) {
            let _ = writeln!(
                out,
                "  note: {to} is not exported, so nodes of cluster {} cannot pick it with get_addr_by_type",
                from.cluster()
            );
        }
        Ok(out)
    }
}

fn check_net_addr(net_addr: &str) -> Result<(), String> {
    match net_addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("network address {net_addr:?} is not host:port")),
    }
}
