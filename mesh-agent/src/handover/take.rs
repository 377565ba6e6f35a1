//! The starting agent's side: find the running agent, receive what it holds, and tell it when
//! to stop accepting.

use std::{path::Path, time::Duration, time::Instant};

use tracing::info;

use super::{wire::Conn, AgentInfo, HandoverError, Inventory, Message, Refusal, PROTOCOL};

/// How long the running agent may take to answer each step. It answers at once; this only
/// bounds a hung one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The running agent, once it has handed its inventory over.
pub struct Predecessor {
    conn: Conn,
    agent: AgentInfo,
    /// When this agent said hello: the handover's time is counted from here.
    began: Instant,
}

/// How long a handover took.
#[derive(Debug)]
pub struct Durations {
    /// From hello to released: both agents ran side by side (the new one started meanwhile).
    pub overlap: Duration,
    /// From "take over" to released: the switch itself.
    pub switch: Duration,
}

/// What [`Predecessor::take_over`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum TakeOver {
    /// It stopped accepting and is draining.
    Released,
    /// It had gone (killed, crashed) before it could answer; everything it held was already
    /// handed over, so this agent carries on alone.
    Gone,
}

/// Asks the agent listening at `path` to hand over. `None` when no agent listens there (this
/// agent then starts afresh); an error when one listens but cannot hand over to `me`.
pub fn begin(
    path: &Path,
    me: &AgentInfo,
) -> Result<Option<(Predecessor, Inventory)>, HandoverError> {
    let socket_error = |source| HandoverError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let Some(conn) = Conn::connect(path).map_err(socket_error)? else {
        return Ok(None);
    };
    let began = Instant::now();
    conn.set_timeout(ANSWER_TIMEOUT).map_err(socket_error)?;
    let (pid, uid) = conn.peer().map_err(socket_error)?;
    let protocol_error = |what: String| HandoverError::Protocol { pid, what };
    if uid != rustix::process::geteuid().as_raw() {
        return Err(protocol_error(format!(
            "it runs as uid {uid}, not as this agent's user"
        )));
    }
    conn.send(
        &Message::Hello {
            protocol: PROTOCOL,
            agent: me.clone(),
        },
        &[],
    )
    .map_err(socket_error)?;
    let (agent, count) = match conn.recv().map_err(socket_error)?.0 {
        Message::Inventory {
            protocol,
            agent,
            entries,
        } if protocol == PROTOCOL => (agent, entries),
        Message::Inventory { protocol, .. } => {
            return Err(HandoverError::Refused {
                pid,
                refusal: Refusal::Protocol(protocol),
            })
        }
        Message::Refused { refusal } => return Err(HandoverError::Refused { pid, refusal }),
        other => {
            return Err(protocol_error(format!(
                "{other:?} instead of its inventory"
            )))
        }
    };
    let entries = conn
        .recv_entries(count)
        .map_err(|error| protocol_error(format!("receiving its inventory: {error}")))?;
    info!(
        predecessor = agent.pid,
        version = %agent.version,
        entries = entries.len(),
        "the running agent handed over its listeners and kernel state"
    );
    Ok(Some((
        Predecessor { conn, agent, began },
        Inventory::new(entries),
    )))
}

impl Predecessor {
    pub fn agent(&self) -> &AgentInfo {
        &self.agent
    }

    /// Tells the running agent to stop accepting (this agent serves from now on) and waits
    /// until it has. Returns what happened, how long both agents served side by side (from
    /// hello), and how long the switch itself took.
    pub fn take_over(self) -> Result<(TakeOver, Durations), HandoverError> {
        let switching = Instant::now();
        let outcome = self.switch()?;
        Ok((
            outcome,
            Durations {
                overlap: self.began.elapsed(),
                switch: switching.elapsed(),
            },
        ))
    }

    fn switch(&self) -> Result<TakeOver, HandoverError> {
        let pid = self.agent.pid;
        let gone = |error: &std::io::Error| {
            matches!(
                error.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
            )
        };
        if let Err(error) = self.conn.send(&Message::TakeOver, &[]) {
            if gone(&error) {
                return Ok(TakeOver::Gone);
            }
            return Err(HandoverError::Protocol {
                pid,
                what: format!("telling it to stop: {error}"),
            });
        }
        match self.conn.recv() {
            Ok((Message::Released, _)) => Ok(TakeOver::Released),
            Ok((Message::Refused { refusal }, _)) => Err(HandoverError::Refused { pid, refusal }),
            Ok((other, _)) => Err(HandoverError::Protocol {
                pid,
                what: format!("{other:?} instead of released"),
            }),
            Err(error) if gone(&error) => Ok(TakeOver::Gone),
            Err(error) => Err(HandoverError::Protocol {
                pid,
                what: format!("waiting for it to stop: {error}"),
            }),
        }
    }

    /// Gives up (this agent is not taking over after all): the running agent carries on.
    pub fn abort(self, reason: &str) {
        let _ = self.conn.send(
            &Message::Abort {
                reason: reason.to_owned(),
            },
            &[],
        );
    }
}
