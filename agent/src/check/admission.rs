//! Whether the container runtime's NRI socket takes the plugin: registered once, under a name
//! of its own so the running agent's registration is left alone, and closed again.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Item, Status};
use crate::budget::verdict::Board;
use crate::config::Config;
use crate::nri::{wire, Plugin, Settings};

const NAME: &str = "admission (NRI)";
/// The runtime answers (or configures the plugin) at once; it gives itself 5 s.
const WAIT: Duration = Duration::from_secs(5);

/// What an agent without a plugin, or with one the runtime does not wait for, lets through.
const FAIL_OPEN: &str = "the runtime fails open: while no Tally plugin is registered (agent stopped, restarting), containers start unchecked and hold at start is the only guard";

pub(super) fn admission_item(config: &Config) -> Item {
    let Some(settings) = Settings::of(config) else {
        return Item::new(
            NAME,
            Status::NotChecked,
            "admission.nri_socket is unset: `admission = \"deny\"` budgets hold new workloads frozen at their first tick",
        );
    };
    let socket = settings.socket.display().to_string();
    let check = Settings {
        name: format!("{}-check", settings.name),
        ..settings
    };
    match register(check) {
        Ok(runtime) => Item::new(
            NAME,
            Status::Ok,
            format!("{runtime} at {socket} took the plugin's registration; {FAIL_OPEN}"),
        ),
        Err(why) => Item::new(
            NAME,
            Status::Failed,
            format!(
                "{socket}: {why}; is NRI enabled in the runtime (containerd 1.7: `[plugins.\"io.containerd.nri.v1.nri\"] disable = false`)? Until it is, {FAIL_OPEN}"
            ),
        ),
    }
}

/// Registers and waits for the runtime to configure the plugin; returns the runtime's name and
/// version.
fn register(settings: Settings) -> Result<String, String> {
    let mut stream =
        UnixStream::connect(&settings.socket).map_err(|e| format!("cannot connect: {e}"))?;
    let mut plugin = Plugin::new(settings, Arc::new(Board::default()), None);
    stream
        .write_all(&plugin.register())
        .map_err(|e| format!("cannot write: {e}"))?;
    let deadline = Instant::now() + WAIT;
    let mut demux = wire::Demux::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no answer to RegisterPlugin within {} s",
                WAIT.as_secs()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("cannot wait: {e}"))?;
        let n = stream.read(&mut buf).map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err("the runtime closed the connection".to_owned());
        }
        for (conn, message) in demux.feed(&buf[..n]).map_err(|e| e.to_string())? {
            let reply = plugin
                .handle(conn, message)
                .map_err(|e| tally_error_chain::chain(&e).to_string())?;
            if let Some(reply) = reply {
                stream
                    .write_all(&reply)
                    .map_err(|e| format!("cannot write: {e}"))?;
            }
            if let Some(runtime) = plugin.runtime() {
                return Ok(runtime.to_owned());
            }
        }
    }
}
