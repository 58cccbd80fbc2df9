//! A MARS-compatible `/mars` tree (config `systemd.mars_tree`, off unless set): the few paths
//! MARS's own systemd templates look at, kept from the replicated state the engine holds. The
//! daemon only mirrors; what the stack does is still decided by the engine (`want_op`).
//!
//! ```text
//! TREE/.marsd-tree                       marker: this directory is ours (never a real MARS /mars)
//! TREE/uuid -> CLUSTER-UUID              symlink, once this host is in a cluster (mars.path)
//! TREE/userspace/systemd-trigger         "SECS.NANOS\n", rewritten when the set of local
//!                                        resources changes (mars-trigger.path)
//! TREE/userspace/emergency-trigger       likewise, when a local resource enters emergency
//!                                        mode (mars-emergency.path)
//! TREE/resource-RES/systemd-want -> HOST symlink (or "(none)"), replaced by rename on every
//!                                        write of the want (its mtime grows each time: the
//!                                        icpu nodeagent script compares it with its copy);
//!                                        while a start or stop of RES runs, it shows the
//!                                        want that runs for (`Systemd::run_job`)
//! TREE/resource-RES/systemd-trigger      "SECS.NANOS\n", rewritten when the want, the
//!                                        designated primary or the stack's units change
//!                                        (mars-RES-trigger.path)
//! TREE/resource-RES/userspace/           for the templates' scripts (their copy of the want)
//! ```
//!
//! The systemd trigger files are taken (removed) by `systemd-trigger[-extern]`, which the
//! watchers run ([`MarsTree::consume`]): MARS's `PathExists=` watchers would otherwise start
//! their service again and again. One the tree creates is written once more by the next
//! apply (see `MarsTree::retouch`).
//!
//! When MARS touches what (its kernel module `touch_systemd_trigger`, its `marsadm`
//! `finish_links`/`safe_touch`): a changed `primary` or `systemd-*` link of a resource writes
//! that resource's trigger; a global change writes the global one. A resource this host no
//! longer holds loses its `resource-RES/` directory.
//!
//! The content a trigger file gets is what MARS's kernel writes: the time, `%lld.%09ld\n`. The
//! writes go in place (systemd's `PathChanged=` fires on the close after a write); the want
//! link is made under a temporary name and renamed over the old one, so a reader always sees
//! a whole link.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The marker file that makes a directory ours.
pub const MARKER: &str = ".marsd-tree";
const MARKER_TEXT: &str =
    "This directory is maintained by marsd (systemd.mars_tree): a MARS-compatible view for \
     MARS's systemd templates. Do not put anything else here.\n";

/// Why the tree cannot be used or kept.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The directory holds files marsd did not make (perhaps a real MARS `/mars`).
    #[error(
        "refusing to use {path} as the MARS tree: it holds {entry:?}, which marsd did not make \
         (an empty or missing directory is taken; a real MARS /mars must be moved away first)"
    )]
    NotOurs { path: PathBuf, entry: String },
    #[error("refusing to use {0} as the MARS tree: it is not a directory")]
    NotADirectory(PathBuf),
    #[error("the MARS tree must be an absolute path, not {0}")]
    Relative(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One local resource as the tree shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceState {
    /// The raw `systemd-want` value (`None`: no such key, no link).
    pub want: Option<String>,
    /// The want entry's Lamport stamp: every write of the want is a new link.
    pub want_stamp: u64,
    /// The designated primary (`None`: `(none)`).
    pub primary: Option<String>,
    /// The stack's start and stop units.
    pub units: (Option<String>, Option<String>),
    /// The resource's primary is in emergency mode here.
    pub emergency: bool,
}

/// What the tree shows: the cluster's identity and the local resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeState {
    pub uuid: Option<String>,
    pub resources: BTreeMap<String, ResourceState>,
}

/// What one [`MarsTree::apply`] changed (for the log and the tests).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub links: Vec<PathBuf>,
    pub triggers: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.triggers.is_empty() && self.removed.is_empty()
    }
}

/// The tree at one path, and the state it last showed.
#[derive(Debug)]
pub struct MarsTree {
    path: PathBuf,
    last: Option<TreeState>,
    /// Trigger files taken by `systemd-trigger[-extern]` ([`MarsTree::consume`]): missing on
    /// purpose until the next change (any other missing trigger file is written again).
    consumed: std::collections::BTreeSet<PathBuf>,
    /// Trigger files this tree created (they were missing) in its last [`MarsTree::apply`]:
    /// written once more by the next one if still there. A `PathChanged=` watch on a missing
    /// file sees its creation only as an event of the directory, after which systemd watches
    /// the new file; the second write is the one such a watcher fires on.
    retouch: std::collections::BTreeSet<PathBuf>,
}

impl MarsTree {
    /// Takes `path` as the tree: creates it if missing, and refuses a directory that holds
    /// anything but our marker unless it is empty.
    pub fn open(path: &Path) -> Result<MarsTree, TreeError> {
        if !path.is_absolute() {
            return Err(TreeError::Relative(path.to_path_buf()));
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path).map_err(io(path))?;
            }
            Err(e) => return Err(io(path)(e)),
            Ok(m) if !m.is_dir() => return Err(TreeError::NotADirectory(path.to_path_buf())),
            Ok(_) => {
                if !path.join(MARKER).is_file() {
                    let first = std::fs::read_dir(path)
                        .map_err(io(path))?
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .min();
                    if let Some(entry) = first {
                        return Err(TreeError::NotOurs {
                            path: path.to_path_buf(),
                            entry,
                        });
                    }
                }
            }
        }
        let marker = path.join(MARKER);
        if !marker.is_file() {
            std::fs::write(&marker, MARKER_TEXT).map_err(io(&marker))?;
        }
        Ok(MarsTree {
            path: path.to_path_buf(),
            last: None,
            consumed: Default::default(),
            retouch: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn res_dir(&self, res: &str) -> PathBuf {
        self.path.join(format!("resource-{res}"))
    }

    /// Brings the tree to `state`: the first call writes everything that differs from the
    /// disk (and writes every trigger once, so that watchers started before marsd catch up);
    /// later calls change only what changed since the last one.
    pub fn apply(&mut self, state: &TreeState) -> Result<Applied, TreeError> {
        let mut done = Applied::default();
        for p in std::mem::take(&mut self.retouch) {
            // Taken meanwhile (the watcher saw the creation): nothing to repeat.
            if p.is_file() {
                touch_trigger(&p)?;
                done.triggers.push(p);
            }
        }
        let first = self.last.is_none();
        let last = self.last.take().unwrap_or_default();
        let userspace = self.path.join("userspace");
        std::fs::create_dir_all(&userspace).map_err(io(&userspace))?;

        // uuid
        let uuid = self.path.join("uuid");
        if first || last.uuid != state.uuid {
            match &state.uuid {
                Some(u) if read_link(&uuid).as_deref() != Some(u.as_str()) => {
                    replace_link(&uuid, u, None)?;
                    done.links.push(uuid);
                }
                Some(_) => {}
                None => {
                    let removed = remove_file(&uuid)?;
                    if removed {
                        done.removed.push(uuid);
                    }
                }
            }
        }

        // Resources that went away (or, at the start, directories of resources not here).
        let mut gone: Vec<String> = last
            .resources
            .keys()
            .filter(|r| !state.resources.contains_key(*r))
            .cloned()
            .collect();
        if first {
            for e in std::fs::read_dir(&self.path)
                .map_err(io(&self.path))?
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(r) = name.strip_prefix("resource-") {
                    if !state.resources.contains_key(r) && e.path().is_dir() {
                        gone.push(r.to_string());
                    }
                }
            }
        }
        for r in gone {
            let dir = self.res_dir(&r);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => done.removed.push(dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&dir)(e)),
            }
        }

        for (r, s) in &state.resources {
            let old = last.resources.get(r);
            let dir = self.res_dir(r);
            let us = dir.join("userspace");
            std::fs::create_dir_all(&us).map_err(io(&us))?;
            let want = dir.join("systemd-want");
            let want_changed = old.is_none_or(|o| o.want != s.want || o.want_stamp != s.want_stamp);
            if want_changed {
                match &s.want {
                    // At the start, a link already right is kept (with its mtime: the icpu
                    // script would otherwise take a restart of marsd for a new want).
                    Some(w) if first && read_link(&want).as_deref() == Some(w.as_str()) => {}
                    Some(w) => {
                        replace_link(&want, w, link_mtime(&want))?;
                        done.links.push(want.clone());
                    }
                    None => {
                        if remove_file(&want)? {
                            done.removed.push(want.clone());
                        }
                    }
                }
            }
            let trigger = dir.join("systemd-trigger");
            let touched = match old {
                None => true,
                Some(o) => want_changed || o.primary != s.primary || o.units != s.units,
            };
            if touched || (!trigger.exists() && !self.consumed.contains(&trigger)) {
                self.write_trigger(&trigger)?;
                done.triggers.push(trigger);
            }
        }

        // The global trigger: the set of resources changed (watchers to generate or remove).
        let global = userspace.join("systemd-trigger");
        let set_changed =
            first || last.resources.keys().ne(state.resources.keys()) || last.uuid != state.uuid;
        if set_changed || (!global.exists() && !self.consumed.contains(&global)) {
            self.write_trigger(&global)?;
            done.triggers.push(global);
        }
        let emergency = userspace.join("emergency-trigger");
        let entered = state
            .resources
            .iter()
            .any(|(r, s)| s.emergency && !last.resources.get(r).is_some_and(|o| o.emergency));
        if (entered && !first) || !emergency.exists() {
            touch_trigger(&emergency)?;
            done.triggers.push(emergency);
        }
        self.last = Some(state.clone());
        Ok(done)
    }
}

impl MarsTree {
    /// Removes the trigger file of `res` (`None`: the global one): `systemd-trigger[-extern]`
    /// has taken the trigger, so a watcher's `PathExists=` on it stops being true (since
    /// systemd 246 `PathExists=` starts the service again whenever it ends while the file
    /// exists: MARS's own watchers would loop). The next change writes the file again, which
    /// fires `PathExists=`, `PathChanged=` and `PathModified=` alike. Returns whether there
    /// was one.
    pub fn consume(&mut self, res: Option<&str>) -> Result<bool, TreeError> {
        let p = match res {
            Some(r) => self.res_dir(r).join("systemd-trigger"),
            None => self.path.join("userspace/systemd-trigger"),
        };
        let removed = remove_file(&p)?;
        self.consumed.insert(p);
        Ok(removed)
    }

    /// Writes a trigger file; one that was missing is written again by the next apply (see
    /// [`MarsTree::retouch`]).
    fn write_trigger(&mut self, p: &Path) -> Result<(), TreeError> {
        let created = !p.exists();
        touch_trigger(p)?;
        self.consumed.remove(p);
        if created {
            self.retouch.insert(p.to_path_buf());
        }
        Ok(())
    }

    /// Writes every trigger file again (the global one and each resource's). systemd re-creates
    /// its path watches on a reload, and a write that came while it reloaded is not seen: after
    /// marsd reloaded systemd, the watchers get their event again.
    pub fn retrigger(&mut self) -> Result<Vec<PathBuf>, TreeError> {
        let Some(last) = &self.last else {
            return Ok(Vec::new());
        };
        let mut done = vec![self.path.join("userspace/systemd-trigger")];
        done.extend(
            last.resources
                .keys()
                .map(|r| self.res_dir(r).join("systemd-trigger")),
        );
        for p in &done {
            self.write_trigger(p)?;
        }
        Ok(done)
    }
}

fn read_link(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
}

fn link_mtime(p: &Path) -> Option<i64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| m.mtime())
}

fn remove_file(p: &Path) -> Result<bool, TreeError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(p)(e)),
    }
}

fn now() -> (i64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// Makes `path` a symlink to `target` by renaming a fresh link over it. With `after`, the new
/// link's mtime is at least one second past it (second-granular `stat %Y` sees every write).
fn replace_link(path: &Path, target: &str, after: Option<i64>) -> Result<(), TreeError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(&tmp))?;
    let (mut secs, mut nanos) = now();
    if let Some(a) = after {
        if secs <= a {
            secs = a + 1;
            nanos = 0;
        }
    }
    set_link_mtime(&tmp, secs, nanos).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })
}

/// `utimensat(AT_SYMLINK_NOFOLLOW)`: the link's own times, not its target's.
fn set_link_mtime(p: &Path, secs: i64, nanos: u32) -> std::io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    let times = [t, t];
    // SAFETY: a valid NUL-terminated path and two timespecs, as utimensat(2) wants.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes the time into a trigger file as MARS's kernel does (`%lld.%09ld\n`), in place.
fn touch_trigger(p: &Path) -> Result<(), TreeError> {
    let (secs, nanos) = now();
    // A symlink there is not ours to follow (MARS opens with O_NOFOLLOW too).
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        remove_file(p)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .map_err(io(p))?;
    f.write_all(format!("{secs}.{nanos:09}\n").as_bytes())
        .map_err(io(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn res(want: Option<&str>, stamp: u64, primary: Option<&str>) -> ResourceState {
        ResourceState {
            want: want.map(str::to_string),
            want_stamp: stamp,
            primary: primary.map(str::to_string),
            units: (Some("app.service".into()), Some("app.service".into())),
            emergency: false,
        }
    }

    fn trig(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn refuses_a_directory_that_is_not_ours() {
        let d = tempfile::tempdir().unwrap();
        let mars = d.path().join("mars");
        std::fs::create_dir(&mars).unwrap();
        std::fs::write(mars.join("uuid"), "x").unwrap();
        let e = MarsTree::open(&mars).unwrap_err();
        assert!(matches!(e, TreeError::NotOurs { .. }), "{e}");
        assert!(e.to_string().contains("\"uuid\""), "{e}");
        // Nothing was written into it.
        assert!(!mars.join(MARKER).exists());
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            MarsTree::open(&file),
            Err(TreeError::NotADirectory(_))
        ));
        assert!(matches!(
            MarsTree::open(Path::new("rel/mars")),
            Err(TreeError::Relative(_))
        ));
        // Empty or missing: taken, and ours from then on (also after a restart).
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        MarsTree::open(&empty).unwrap();
        let mut t = MarsTree::open(&d.path().join("new/mars")).unwrap();
        t.apply(&TreeState::default()).unwrap();
        MarsTree::open(&d.path().join("new/mars")).unwrap();
    }

    #[test]
    fn links_and_triggers_follow_the_state() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mars");
        let mut t = MarsTree::open(&p).unwrap();
        let mut s = TreeState {
            uuid: Some("u-1".into()),
            ..Default::default()
        };
        s.resources
            .insert("r1".into(), res(Some("a"), 5, Some("a")));
        let done = t.apply(&s).unwrap();
        let want = p.join("resource-r1/systemd-want");
        let trigger = p.join("resource-r1/systemd-trigger");
        let global = p.join("userspace/systemd-trigger");
        assert_eq!(std::fs::read_link(&want).unwrap(), Path::new("a"));
        assert_eq!(
            std::fs::read_link(p.join("uuid")).unwrap(),
            Path::new("u-1")
        );
        assert!(p.join("resource-r1/userspace").is_dir());
        assert!(p.join("userspace/emergency-trigger").is_file());
        assert!(done.triggers.contains(&trigger) && done.triggers.contains(&global));
        let stamp = trig(&trigger);
        assert!(stamp.ends_with('\n') && stamp.trim().split('.').nth(1).unwrap().len() == 9);

        // The systemd trigger files just created are written once more by the next apply (for
        // watchers that saw only their creation), then nothing changed: nothing written.
        assert_eq!(
            t.apply(&s).unwrap().triggers,
            vec![trigger.clone(), global.clone()]
        );
        assert!(t.apply(&s).unwrap().is_empty());

        // `systemd-trigger-extern r1` takes its trigger (and then the global one): the files
        // go; the next change writes the resource's again.
        assert!(t.consume(Some("r1")).unwrap());
        assert!(!trigger.exists() && global.exists());
        assert!(!t.consume(Some("r1")).unwrap());
        assert!(t.consume(None).unwrap());
        assert!(!global.exists());
        assert!(t.apply(&s).unwrap().is_empty());
        s.resources.get_mut("r1").unwrap().primary = Some("b".into());
        assert_eq!(t.apply(&s).unwrap().triggers, vec![trigger.clone()]);
        assert!(trigger.is_file());
        // Created again: written once more; the global one stays taken.
        assert_eq!(t.apply(&s).unwrap().triggers, vec![trigger.clone()]);
        assert!(!global.exists());
        s.resources.get_mut("r1").unwrap().primary = Some("a".into());
        t.apply(&s).unwrap();
        // A reload writes every trigger again, the consumed global one too (and it once more
        // by the next apply).
        t.retrigger().unwrap();
        assert!(global.is_file());
        assert_eq!(t.apply(&s).unwrap().triggers, vec![global.clone()]);
        assert!(t.apply(&s).unwrap().is_empty());

        // The same want written again (new stamp): a new link with a later mtime, a trigger.
        let m1 = std::fs::symlink_metadata(&want).unwrap().mtime();
        s.resources.get_mut("r1").unwrap().want_stamp = 6;
        let done = t.apply(&s).unwrap();
        assert_eq!(done.links, vec![want.clone()]);
        assert_eq!(done.triggers, vec![trigger.clone()]);
        assert!(std::fs::symlink_metadata(&want).unwrap().mtime() > m1);

        // A handover: the designated primary changes, then the want.
        s.resources.get_mut("r1").unwrap().primary = None;
        assert_eq!(t.apply(&s).unwrap().triggers, vec![trigger.clone()]);
        let r = s.resources.get_mut("r1").unwrap();
        r.want = Some("b".into());
        r.want_stamp = 7;
        t.apply(&s).unwrap();
        assert_eq!(std::fs::read_link(&want).unwrap(), Path::new("b"));

        // A second resource: the global trigger; emergency: its trigger.
        let g0 = trig(&global);
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.resources.insert("r2".into(), res(None, 0, None));
        let done = t.apply(&s).unwrap();
        assert!(done.triggers.contains(&global), "{done:?}");
        assert_ne!(trig(&global), g0);
        assert!(!p.join("resource-r2/systemd-want").exists());
        s.resources.get_mut("r2").unwrap().emergency = true;
        let done = t.apply(&s).unwrap();
        // (r2's new trigger file once more, see above.)
        assert_eq!(
            done.triggers,
            vec![
                p.join("resource-r2/systemd-trigger"),
                p.join("userspace/emergency-trigger")
            ]
        );

        // Left: the directory goes.
        s.resources.remove("r1");
        let done = t.apply(&s).unwrap();
        assert_eq!(done.removed, vec![p.join("resource-r1")]);
        assert!(!p.join("resource-r1").exists());

        // A restart: a stale resource directory goes, a right link keeps its mtime.
        std::fs::create_dir_all(p.join("resource-old/userspace")).unwrap();
        s.resources.get_mut("r2").unwrap().want = Some("(none)".into());
        t.apply(&s).unwrap();
        let w2 = p.join("resource-r2/systemd-want");
        let m2 = std::fs::symlink_metadata(&w2).unwrap().mtime();
        let mut t2 = MarsTree::open(&p).unwrap();
        let done = t2.apply(&s).unwrap();
        assert_eq!(done.removed, vec![p.join("resource-old")]);
        assert!(done.links.is_empty(), "{done:?}");
        assert_eq!(std::fs::symlink_metadata(&w2).unwrap().mtime(), m2);
        assert_eq!(std::fs::read_link(&w2).unwrap(), Path::new("(none)"));
    }
}
