//! QMP, the QEMU Machine Protocol, as far as the driver speaks it: typed
//! requests for the commands it sends (their arguments and return values
//! are serde structs, so a misspelt argument is a compile error rather
//! than a QMP error at run time), and a small client that sends one
//! command at a time and keeps the events that arrive meanwhile.
//!
//! Why not the `qapi-qmp` crate: its latest release (0.15) is generated
//! from QEMU 9.1's schema and only passively maintained. It does carry
//! `migrate` with `channels`, the `mapped-ram` capability and
//! `exit-on-error`, and those match QEMU 10.0's schema, but it builds
//! every one of QEMU's ~970 QAPI definitions to use eight commands, and its
//! closed event enum would refuse an event newer than 9.1. The driver's
//! eight commands are below.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::driver::api::SegmentEnd;

/// A QMP command: its wire name, its arguments (the value itself; a unit
/// struct sends none) and what it returns.
pub(crate) trait Command: Serialize {
    const NAME: &'static str;
    type Return: DeserializeOwned;
}

/// The empty object most commands return.
#[derive(Debug, Deserialize)]
pub(crate) struct Empty {}

macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident = $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Serialize)]
        pub(crate) struct $ty;

        impl Command for $ty {
            const NAME: &'static str = $name;
            type Return = Empty;
        }
    };
}

unit_command!(
    /// Leaves capability negotiation mode; every other command needs it first.
    QmpCapabilities = "qmp_capabilities"
);
unit_command!(
    /// Lets the guest's vCPUs run.
    Cont = "cont"
);
unit_command!(
    /// Pauses the guest's vCPUs.
    Stop = "stop"
);
unit_command!(
    /// Ends QEMU, flushing and closing its files.
    Quit = "quit"
);

/// `query-replay`: the instruction count QEMU keeps under `-icount`
/// (record/replay need not be on: `mode` is then `none`).
#[derive(Debug, Serialize)]
pub(crate) struct QueryReplay;

impl Command for QueryReplay {
    const NAME: &'static str = "query-replay";
    type Return = ReplayInfo;
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReplayInfo {
    pub icount: u64,
}

/// `human-monitor-command`: an HMP command (`one-insn-per-tb` has no QMP
/// twin); returns what HMP printed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct HumanMonitorCommand {
    pub command_line: String,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Return = String;
}

/// `migrate-set-capabilities`.
#[derive(Debug, Serialize)]
pub(crate) struct MigrateSetCapabilities {
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Return = Empty;
}

#[derive(Debug, Serialize)]
pub(crate) struct MigrationCapabilityStatus {
    pub capability: MigrationCapability,
    pub state: bool,
}

/// The migration capabilities the driver sets.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum MigrationCapability {
    /// RAM pages at fixed offsets of a file (QEMU 9.0+): zero pages are
    /// holes and unchanged pages stay where they were.
    MappedRam,
    /// RAM blocks backed by a shared file are left out of the save (and
    /// of the load): the guest's RAM when it runs in a file of its own.
    XIgnoreShared,
}

/// `migrate`: saves the (stopped) machine through `channels`.
#[derive(Debug, Serialize)]
pub(crate) struct Migrate {
    pub channels: Vec<MigrationChannel>,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Return = Empty;
}

/// `migrate-incoming`: loads a machine into a QEMU started with
/// `-incoming defer`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct MigrateIncoming {
    pub channels: Vec<MigrationChannel>,
    /// False: a bad stream leaves QEMU up, so `query-migrate` can say why.
    pub exit_on_error: bool,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Return = Empty;
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct MigrationChannel {
    pub channel_type: MigrationChannelType,
    pub addr: MigrationAddress,
}

impl MigrationChannel {
    /// The main channel to a local file (structured, so paths with commas
    /// are not mangled the way a `file:` URI would be).
    pub fn file(filename: &str) -> Vec<MigrationChannel> {
        vec![MigrationChannel {
            channel_type: MigrationChannelType::Main,
            addr: MigrationAddress::File {
                filename: filename.to_string(),
                offset: 0,
            },
        }]
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum MigrationChannelType {
    Main,
}

#[derive(Debug, Serialize)]
#[serde(tag = "transport", rename_all = "kebab-case")]
pub(crate) enum MigrationAddress {
    File { filename: String, offset: u64 },
}

/// `query-migrate`: how the migration at either end stands.
#[derive(Debug, Serialize)]
pub(crate) struct QueryMigrate;

impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Return = MigrationInfo;
}

/// The part of `query-migrate`'s answer the driver reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct MigrationInfo {
    pub status: Option<MigrationStatus>,
    pub error_desc: Option<String>,
}

/// QEMU's `MigrationStatus` (QEMU 10.0), and `Unknown` for whatever a
/// later QEMU adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The name QEMU uses (serde's), "unknown" for a status it added later.
        match serde_json::to_value(self) {
            Ok(Value::String(name)) => f.write_str(&name),
            _ => write!(f, "{self:?}"),
        }
    }
}

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    #[error("cancelled")]
    Cancelled,
    /// The connection ended: QEMU exited or is exiting.
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Failed(String),
}

/// An event QEMU sent.
pub(crate) struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// A minimal QMP client: one command at a time, matched by id; events
/// that arrive meanwhile are kept for the segment to inspect.
///
/// A reader task turns lines into messages on a channel, so waiting for
/// the next message can sit in a `select!` with the segment timer and the
/// cancellation token without losing half-read lines. The task ends with
/// the connection, and is aborted when the client is dropped.
pub(crate) struct Qmp {
    writer: OwnedWriteHalf,
    rx: mpsc::UnboundedReceiver<Result<Value, String>>,
    reader: JoinHandle<()>,
    events: Vec<QmpEvent>,
    next_id: u64,
}

impl Qmp {
    pub fn new(stream: UnixStream) -> Qmp {
        let (read, writer) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_messages(read, tx));
        Qmp {
            writer,
            rx,
            reader,
            events: Vec::new(),
            next_id: 1,
        }
    }

    /// The next message, whatever it is.
    pub async fn recv(&mut self) -> Result<Value, QmpError> {
        match self.rx.recv().await {
            None => Err(QmpError::Closed),
            Some(msg) => msg.map_err(QmpError::Failed),
        }
    }

    /// Keeps `msg` if it is an event.
    pub fn keep_event(&mut self, msg: &Value) {
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or_default();
            tracing::debug!(event = name, %data, "QMP event");
            self.events.push(QmpEvent {
                name: name.to_string(),
                data,
            });
        }
    }

    /// How the guest ended, from the events seen so far.
    pub fn guest_end(&self) -> Option<SegmentEnd> {
        guest_end(&self.events)
    }

    /// Sends `command` and waits for its answer, keeping the events that
    /// come first. `timeout` bounds the whole exchange.
    pub async fn execute<C: Command>(
        &mut self,
        command: &C,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<C::Return, QmpError> {
        let deadline = Instant::now() + timeout;
        let id = self.send(command, deadline, cancel).await?;
        self.answer::<C>(id, deadline, cancel).await
    }

    /// Sends `command` without waiting for its answer (QEMU may answer
    /// only after something else has happened); its id for [`Self::answer`].
    pub async fn send<C: Command>(
        &mut self,
        command: &C,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<u64, QmpError> {
        let name = C::NAME;
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": name, "id": id });
        let args = serde_json::to_value(command)
            .map_err(|e| QmpError::Failed(format!("{name}: arguments do not serialize: {e}")))?;
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        tokio::select! {
            _ = cancel.cancelled() => Err(QmpError::Cancelled),
            sent = tokio::time::timeout_at(deadline, self.writer.write_all(&line)) => match sent {
                Err(_) => Err(QmpError::Timeout(format!("{name}: not sent in time"))),
                Ok(Err(_)) => Err(QmpError::Closed),
                Ok(Ok(())) => Ok(id),
            },
        }
    }

    /// Waits for the answer to the command sent as `id`, keeping the
    /// events that come first.
    pub async fn answer<C: Command>(
        &mut self,
        id: u64,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<C::Return, QmpError> {
        let name = C::NAME;
        let timed_out = || QmpError::Timeout(format!("{name}: no answer in time"));
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return Err(QmpError::Cancelled),
                msg = tokio::time::timeout_at(deadline, self.recv()) => msg.map_err(|_| timed_out())??,
            };
            if msg.get("event").is_some() {
                self.keep_event(&msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return serde_json::from_value(ret.clone())
                    .map_err(|e| QmpError::Failed(format!("{name}: unexpected answer {ret}: {e}")));
            }
            let desc = msg
                .get("error")
                .map(|e| {
                    e.get("desc")
                        .and_then(Value::as_str)
                        .map_or_else(|| e.to_string(), str::to_string)
                })
                .unwrap_or_else(|| format!("unexpected answer {msg}"));
            return Err(QmpError::Failed(format!("{name}: {desc}")));
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_messages(read: OwnedReadHalf, tx: mpsc::UnboundedSender<Result<Value, String>>) {
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let msg = serde_json::from_slice::<Value>(&line)
            .map_err(|e| format!("bad QMP message {:?}: {e}", String::from_utf8_lossy(&line)));
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// SHUTDOWN says why (`guest-shutdown` is a poweroff; `guest-reset` and
/// `guest-panic` are crashes under -no-reboot); GUEST_PANICKED comes from
/// a pvpanic device. A `host-*` reason (a signal to QEMU, say) ends the
/// segment too, but the reason says it was not the guest's doing.
fn guest_end(events: &[QmpEvent]) -> Option<SegmentEnd> {
    events.iter().find_map(|ev| match ev.name.as_str() {
        "SHUTDOWN" => {
            let reason = ev.data.get("reason").and_then(Value::as_str).unwrap_or("unknown");
            Some(match reason {
                "guest-shutdown" => SegmentEnd::Halted,
                r if r.starts_with("guest-") => SegmentEnd::Crashed {
                    reason: r.to_string(),
                },
                r => SegmentEnd::Crashed {
                    reason: format!("QEMU shut down by the host ({r})"),
                },
            })
        }
        "GUEST_PANICKED" => Some(SegmentEnd::Crashed {
            reason: "guest-panic".into(),
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire<C: Command>(command: &C) -> Value {
        serde_json::to_value(command).unwrap()
    }

    #[test]
    fn requests_are_what_qemu_10_expects() {
        assert_eq!(wire(&Cont), Value::Null);
        assert_eq!(
            wire(&MigrateSetCapabilities {
                capabilities: vec![MigrationCapabilityStatus {
                    capability: MigrationCapability::MappedRam,
                    state: true,
                }],
            }),
            json!({ "capabilities": [{ "capability": "mapped-ram", "state": true }] })
        );
        let channels = json!([{
            "channel-type": "main",
            "addr": { "transport": "file", "filename": "/w/a,b", "offset": 0 },
        }]);
        assert_eq!(
            wire(&Migrate {
                channels: MigrationChannel::file("/w/a,b")
            }),
            json!({ "channels": channels })
        );
        assert_eq!(
            wire(&MigrateIncoming {
                channels: MigrationChannel::file("/w/a,b"),
                exit_on_error: false,
            }),
            json!({ "channels": channels, "exit-on-error": false })
        );
    }

    #[test]
    fn migration_info_is_read_and_unknown_statuses_kept_apart() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "failed",
            "error-desc": "Unable to read from file",
            "total-time": 12,
        }))
        .unwrap();
        assert_eq!(info.status, Some(MigrationStatus::Failed));
        assert_eq!(info.error_desc.as_deref(), Some("Unable to read from file"));
        let info: MigrationInfo = serde_json::from_value(json!({ "status": "something-new" })).unwrap();
        assert_eq!(info.status, Some(MigrationStatus::Unknown));
        let info: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(info.status, None);
        assert_eq!(
            MigrationStatus::PostcopyRecoverSetup.to_string(),
            "postcopy-recover-setup"
        );
        assert_eq!(MigrationStatus::Completed.to_string(), "completed");
    }

    #[test]
    fn shutdown_events_end_the_guest() {
        let ev = |name: &str, data: Value| QmpEvent {
            name: name.into(),
            data,
        };
        assert_eq!(guest_end(&[ev("RESUME", Value::Null)]), None);
        assert_eq!(
            guest_end(&[ev(
                "SHUTDOWN",
                json!({ "guest": true, "reason": "guest-shutdown" })
            )]),
            Some(SegmentEnd::Halted)
        );
        assert_eq!(
            guest_end(&[ev("SHUTDOWN", json!({ "guest": true, "reason": "guest-reset" }))]),
            Some(SegmentEnd::Crashed {
                reason: "guest-reset".into()
            })
        );
        assert_eq!(
            guest_end(&[ev("SHUTDOWN", json!({ "guest": false, "reason": "host-signal" }))]),
            Some(SegmentEnd::Crashed {
                reason: "QEMU shut down by the host (host-signal)".into()
            })
        );
        assert_eq!(
            guest_end(&[ev("GUEST_PANICKED", json!({ "action": "pause" }))]),
            Some(SegmentEnd::Crashed {
                reason: "guest-panic".into()
            })
        );
    }
}
