//! The `*-global` commands (MARS's `pause-fetch-global` & co.): one replicated request that
//! every member's engine applies to its own switch (`mars_engine::request`), then a wait until
//! every reachable member recorded it. A host writes only its own switches, so this is how
//! one host switches them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mars_api::{ErrorKind, SwitchKind};
use mars_config::ResourceName;
use mars_engine::request::{is_global_switch, RequestValue};
use mars_engine::{keys, RequestId};

use super::{done, failed, invalid, not_found, Outcome};
use crate::host::Host;

/// How often the members' records are looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// `SWITCH-global RES`: writes the request and waits up to `timeout` seconds until every
/// reachable member applied it (or a newer one). Members that are unreachable now apply it
/// when they are back; the answer names them.
pub async fn switch(
    host: &Arc<Host>,
    res: ResourceName,
    switch: SwitchKind,
    on: bool,
    timeout: u64,
    dry: bool,
) -> Outcome {
    let sw = switch.as_str();
    if !is_global_switch(sw) {
        return Err(invalid(format!(
            "{sw} is not switched globally (MARS has no {sw}-global): run it on each member"
        )));
    }
    let m = host.store.resource_meta(&res).await.map_err(failed)?;
    if !m.exists() {
        return Err(not_found(&res));
    }
    let me = host.ident.host.clone();
    let key = keys::request(&res, sw);
    let word = if on { "on" } else { "off" };
    let value = RequestValue { on, by: me.clone() }.to_json();
    if dry {
        let members: Vec<String> = m.members.keys().map(ToString::to_string).collect();
        return done(format!(
            "{res}: would set {key} = {value}: every member ({}) would turn {sw} {word} on \
             itself",
            members.join(", ")
        ));
    }
    let written = host
        .store
        .write(vec![(key.clone(), value)], Vec::new())
        .await
        .map_err(|e| failed(format!("cannot write {key}: {e}")))?;
    let stamp = written
        .first()
        .map(|e| e.stamp)
        .ok_or_else(|| failed(format!("cannot write {key}: nothing written")))?;
    let id = RequestId { stamp, by: me };
    // MARS's -1 (no limit) arrives as a huge number: no deadline then.
    let deadline = Instant::now().checked_add(Duration::from_secs(timeout));
    loop {
        let m = host.store.resource_meta(&res).await.map_err(failed)?;
        let live = host.liveness();
        let (mut applied, mut pending, mut away) = (Vec::new(), Vec::new(), Vec::new());
        for (h, mem) in &m.members {
            // Joined after the request: not asked (its engine ignores the request too).
            if mem.since > stamp {
                continue;
            }
            if mem.applied.get(sw).is_some_and(|a| *a >= id) {
                applied.push(h.to_string());
            } else if *h == host.ident.host || live.reachable.contains(h) {
                pending.push(h.to_string());
            } else {
                away.push(h.to_string());
            }
        }
        let away_text = if away.is_empty() {
            String::new()
        } else {
            format!(
                "; not reachable now, switching when back: {}",
                away.join(", ")
            )
        };
        if pending.is_empty() {
            let on_whom = if applied.is_empty() {
                "no reachable member".to_string()
            } else {
                applied.join(", ")
            };
            return done(format!("{res}: {sw} {word} on {on_whom}{away_text}"));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err((
                ErrorKind::Timeout,
                format!(
                    "{res}: {sw} {word} requested; after {timeout} s not yet applied by {} \
                     (the request stands: they switch when they get to it){}{away_text}",
                    pending.join(", "),
                    if applied.is_empty() {
                        String::new()
                    } else {
                        format!("; applied by {}", applied.join(", "))
                    }
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
