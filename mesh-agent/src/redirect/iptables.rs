//! The iptables backend, the fallback for kernels without cgroup BPF hooks: in each enrolled
//! pod's own network namespace, a `nat` `OUTPUT` rule `REDIRECT`s the pod's outbound TCP to the
//! agent's in-pod listener, and the agent reads where each connection was going from conntrack
//! (`SO_ORIGINAL_DST`).
//!
//! Unlike the eBPF programs this fails closed: rules left behind by an agent that died (SIGKILL)
//! keep redirecting to a listener that is gone, so the pod's connections are refused until an
//! agent enrolls the pod again (which replaces the stale rules) or someone removes them.

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddrV4,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Mutex,
};

use tracing::warn;

use super::{error::RedirectError, netns::NetNs, preflight};

/// The agent's chain in each enrolled pod's `nat` table.
pub const CHAIN: &str = "MESH_OUTPUT";

/// Rules installed in enrolled pods' namespaces. Dropping it removes them from every pod still
/// enrolled.
pub struct IptablesRedirect {
    restore: PathBuf,
    save: PathBuf,
    agent_mark: u32,
    /// Namespaces with rules in place, by cookie: unenroll and drop need them after the caller
    /// has let go of its own handle.
    enrolled: Mutex<HashMap<u64, NetNs>>,
}

impl IptablesRedirect {
    /// Checks for root and the iptables tools; installs nothing yet. `agent_mark` is the socket
    /// mark of the agent's own sockets, which the rules let through: forgeable by a pod with
    /// `CAP_NET_ADMIN` (see [`super::Exemption::Mark`]), the known weakness of this mode.
    pub fn new(agent_mark: u32) -> Result<IptablesRedirect, RedirectError> {
        let (restore, save) = preflight::check_iptables()?;
        Ok(IptablesRedirect {
            restore,
            save,
            agent_mark,
            enrolled: Mutex::new(HashMap::new()),
        })
    }

    /// Installs the redirect to `listener`'s port in `netns`, replacing any rules of ours already
    /// there (e.g. left by an agent that was killed): one atomic `iptables-restore`.
    pub fn enroll(
        &self,
        netns: &NetNs,
        netns_cookie: u64,
        listener: SocketAddrV4,
    ) -> Result<(), RedirectError> {
        let installed = Installed::parse(&self.save(netns)?);
        let script = install_script(&installed, self.agent_mark, listener.port());
        self.restore(netns, &script)?;
        let handle = netns.try_clone().map_err(|source| RedirectError::Netns {
            path: netns.path().to_path_buf(),
            source,
        })?;
        self.enrolled
            .lock()
            .expect("enrolled namespaces lock")
            .insert(netns_cookie, handle);
        Ok(())
    }

    /// Removes the rules from that namespace. Idempotent.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), RedirectError> {
        let netns = self
            .enrolled
            .lock()
            .expect("enrolled namespaces lock")
            .remove(&netns_cookie);
        match netns {
            Some(netns) => self.remove(&netns),
            None => Ok(()),
        }
    }

    /// Forgets every namespace: the rules stay where they are (a successor serves them), and
    /// neither unenroll nor drop removes them.
    pub fn relinquish(&self) {
        self.enrolled
            .lock()
            .expect("enrolled namespaces lock")
            .clear();
    }

    /// The mark the rules let pass: the agent's upstream sockets carry it. Any process with
    /// `CAP_NET_ADMIN` in a pod's namespace can set it too; iptables sees nothing better.
    pub fn agent_mark(&self) -> u32 {
        self.agent_mark
    }

    /// How many namespaces have rules installed now.
    pub fn enrolled_count(&self) -> usize {
        self.enrolled
            .lock()
            .expect("enrolled namespaces lock")
            .len()
    }

    /// Where the accepted connection `stream` was going, from conntrack. `None` when it was not
    /// redirected (dialled straight at the listener: conntrack's original destination is then
    /// the listener itself) or conntrack has no entry.
    pub fn original_dst(stream: impl AsFd) -> Option<SocketAddrV4> {
        let fd = stream.as_fd();
        let original = rustix::net::sockopt::ip_original_dst(fd).ok()?;
        let local = socket2::SockRef::from(&fd)
            .local_addr()
            .ok()?
            .as_socket_ipv4();
        redirected(original, local)
    }

    /// Removes our chain and every jump to it from `netns`, if any are there.
    fn remove(&self, netns: &NetNs) -> Result<(), RedirectError> {
        let installed = Installed::parse(&self.save(netns)?);
        match remove_script(&installed) {
            Some(script) => self.restore(netns, &script),
            None => Ok(()),
        }
    }

    /// `iptables-save -t nat` in `netns`.
    fn save(&self, netns: &NetNs) -> Result<String, RedirectError> {
        let output = run_in(netns, "iptables-save", &self.save, &["-t", "nat"], None)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `iptables-restore --noflush` of `script` in `netns`: all of it applies, or none.
    fn restore(&self, netns: &NetNs, script: &str) -> Result<(), RedirectError> {
        let args = ["--noflush", "--wait"];
        run_in(
            netns,
            "iptables-restore",
            &self.restore,
            &args,
            Some(script),
        )
        .map(drop)
    }
}

impl Drop for IptablesRedirect {
    fn drop(&mut self) {
        let enrolled = std::mem::take(self.enrolled.get_mut().expect("enrolled namespaces lock"));
        for netns in enrolled.into_values() {
            if let Err(error) = self.remove(&netns) {
                warn!(%error, "leaving iptables rules behind");
            }
        }
    }
}

/// Runs `tool` with the calling thread inside `netns` (a child inherits its spawning thread's
/// namespace), feeding it `stdin`; an error unless it exits 0.
fn run_in(
    netns: &NetNs,
    command: &'static str,
    tool: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, RedirectError> {
    let failed = |reason: String| RedirectError::Iptables {
        command,
        netns: netns.path().to_path_buf(),
        reason,
    };
    let output = netns
        .run(|| {
            let mut child = Command::new(tool)
                .args(args)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes())?;
            }
            child.wait_with_output()
        })
        .map_err(|error| failed(format!("cannot run {}: {error}", tool.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(failed(format!("{}: {}", output.status, stderr.trim())));
    }
    Ok(output)
}

/// What of ours `iptables-save -t nat` shows.
#[derive(Debug, Default, PartialEq)]
struct Installed {
    chain: bool,
    /// Rules jumping to our chain, as `iptables-save` prints them (`-A OUTPUT ... -j MESH_OUTPUT`).
    jumps: Vec<String>,
}

impl Installed {
    fn parse(save: &str) -> Installed {
        let mut installed = Installed::default();
        for line in save.lines().map(str::trim) {
            if line
                .strip_prefix(':')
                .and_then(|rest| rest.split_whitespace().next())
                == Some(CHAIN)
            {
                installed.chain = true;
            }
            let mut words = line.split_whitespace();
            if words.next() == Some("-A")
                && words.next() != Some(CHAIN)
                && words
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|pair| pair == ["-j", CHAIN])
            {
                installed.jumps.push(line.to_owned());
            }
        }
        installed
    }

    /// `-D ...` lines deleting every jump to our chain.
    fn delete_jumps(&self) -> impl Iterator<Item = String> + '_ {
        self.jumps
            .iter()
            .map(|jump| format!("-D{}", &jump["-A".len()..]))
    }
}

/// Replaces whatever of ours is in the `nat` table with the redirect to `port`. Declaring the
/// chain creates it, or flushes it when it exists.
fn install_script(installed: &Installed, agent_mark: u32, port: u16) -> String {
    let mut script = format!("*nat\n:{CHAIN} - [0:0]\n");
    for delete in installed.delete_jumps() {
        script += &delete;
        script.push('\n');
    }
    script += &format!(
        "-A {CHAIN} -m mark --mark {agent_mark:#x} -j RETURN\n\
         -A {CHAIN} -d 127.0.0.0/8 -j RETURN\n\
         -A {CHAIN} -m addrtype --dst-type LOCAL -j RETURN\n\
         -A {CHAIN} -p tcp -j REDIRECT --to-ports {port}\n\
         -A OUTPUT -p tcp -j {CHAIN}\n\
         COMMIT\n"
    );
    script
}

/// Removes our jumps and chain; `None` when nothing of ours is there.
fn remove_script(installed: &Installed) -> Option<String> {
    if *installed == Installed::default() {
        return None;
    }
    let mut script = String::from("*nat\n");
    for delete in installed.delete_jumps() {
        script += &delete;
        script.push('\n');
    }
    if installed.chain {
        script += &format!("-F {CHAIN}\n-X {CHAIN}\n");
    }
    script += "COMMIT\n";
    Some(script)
}

/// A connection whose original destination is the socket's own address was not NATed.
fn redirected(original: SocketAddrV4, local: Option<SocketAddrV4>) -> Option<SocketAddrV4> {
    (Some(original) != local).then_some(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: u32 = 0x4d45_5348;

    /// `iptables-save -t nat` of a pod with our rules and one rule of its own.
    const SAVED: &str = "# Generated by iptables-save v1.8.9 (nf_tables)\n\
        *nat\n\
        :PREROUTING ACCEPT [0:0]\n\
        :INPUT ACCEPT [0:0]\n\
        :OUTPUT ACCEPT [0:0]\n\
        :POSTROUTING ACCEPT [0:0]\n\
        :MESH_OUTPUT - [0:0]\n\
        -A OUTPUT -d 10.0.0.9/32 -p tcp -j DNAT --to-destination 10.0.0.10\n\
        -A OUTPUT -p tcp -j MESH_OUTPUT\n\
        -A MESH_OUTPUT -m mark --mark 0x4d455348 -j RETURN\n\
        -A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
        COMMIT\n";

    #[test]
    fn a_fresh_pod_gets_the_chain_and_one_jump() {
        assert_eq!(
            install_script(&Installed::default(), MARK, 15001),
            "*nat\n\
             :MESH_OUTPUT - [0:0]\n\
             -A MESH_OUTPUT -m mark --mark 0x4d455348 -j RETURN\n\
             -A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
             -A MESH_OUTPUT -m addrtype --dst-type LOCAL -j RETURN\n\
             -A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n\
             -A OUTPUT -p tcp -j MESH_OUTPUT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn saved_rules_of_ours_are_found_and_the_pods_own_left_alone() {
        let installed = Installed::parse(SAVED);
        assert_eq!(
            installed,
            Installed {
                chain: true,
                jumps: vec!["-A OUTPUT -p tcp -j MESH_OUTPUT".to_owned()],
            }
        );
        assert_eq!(
            Installed::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            Installed::default()
        );
    }

    #[test]
    fn stale_rules_are_replaced_in_the_same_transaction() {
        let script = install_script(&Installed::parse(SAVED), MARK, 15002);
        assert!(
            script.starts_with(
                "*nat\n:MESH_OUTPUT - [0:0]\n-D OUTPUT -p tcp -j MESH_OUTPUT\n-A MESH_OUTPUT "
            ),
            "{script}"
        );
        assert_eq!(script.matches("-A OUTPUT").count(), 1, "{script}");
        assert!(script.contains("--to-ports 15002\n"), "{script}");
        assert!(!script.contains("DNAT"), "{script}");
    }

    #[test]
    fn removal_deletes_every_jump_then_the_chain_and_nothing_when_absent() {
        let saved = SAVED.replace(
            "-A OUTPUT -p tcp -j MESH_OUTPUT\n",
            "-A OUTPUT -p tcp -j MESH_OUTPUT\n-A OUTPUT -o eth0 -j MESH_OUTPUT\n",
        );
        assert_eq!(
            remove_script(&Installed::parse(&saved)).unwrap(),
            "*nat\n\
             -D OUTPUT -p tcp -j MESH_OUTPUT\n\
             -D OUTPUT -o eth0 -j MESH_OUTPUT\n\
             -F MESH_OUTPUT\n\
             -X MESH_OUTPUT\n\
             COMMIT\n"
        );
        assert_eq!(remove_script(&Installed::default()), None);
    }

    #[test]
    fn a_connection_straight_to_the_listener_has_no_original_destination() {
        let listener: SocketAddrV4 = "127.0.0.1:15001".parse().unwrap();
        assert_eq!(redirected(listener, Some(listener)), None);
        let vip = "10.96.0.30:8080".parse().unwrap();
        assert_eq!(redirected(vip, Some(listener)), Some(vip));
    }

    #[test]
    #[expect(
        clippy::disallowed_methods,
        reason = "a test thread, and a plain connected pair is what it needs"
    )]
    fn an_accepted_socket_without_nat_has_no_original_destination() {
        // Whether or not conntrack tracks loopback here, a plain connection is not redirected.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(IptablesRedirect::original_dst(&accepted), None);
    }
}
