//! Crash tests: every operation runs once against `mars_storage::mem` with a crash image at
//! every sync point, and every image is reopened and checked (as `mars-volume`'s
//! `tests/volume.rs` does for the primary's write path).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use mars_config::HostName;
use mars_replica::control::{self, ControlState, Marker, SyncFile};
use mars_replica::{Copies, CopyAppender, Replay, ReplayEvent};
use mars_storage::mem::{CrashImage, MemDir};
use mars_storage::{Dir, File, OpenMode};
use mars_txlog::format::{encode, Header};
use mars_txlog::{Kind, LogName, LogPos};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DISK: u64 = 32 << 10;

fn alpha() -> HostName {
    HostName::new("alpha").unwrap()
}

/// Which images were taken while which operation ran: `done_at[i]` is the number of sync
/// points when operation `i` returned, so an image at sync point `s` comes after every
/// operation with `done_at <= s` and before or during the next one.
fn completed(done_at: &[u64], img: &CrashImage) -> usize {
    done_at.iter().take_while(|&&s| s <= img.sync_point).count()
}

/// A record with sequence number `seq`: a write, a zeroed or a discarded range of the disk.
fn record(rng: &mut StdRng, seq: u64, max_payload: u64) -> (Header, Vec<u8>) {
    let len = rng.gen_range(1..=max_payload);
    let offset = rng.gen_range(0..DISK - len);
    let kind = match rng.gen_range(0..8) {
        0 => Kind::Zero,
        1 => Kind::Discard,
        _ => Kind::Write,
    };
    let payload = if kind == Kind::Write {
        let b: u8 = rng.gen();
        (0..len).map(|i| b.wrapping_add(i as u8) | 1).collect()
    } else {
        Vec::new()
    };
    (
        Header {
            kind,
            seq,
            stamp: seq,
            offset,
            len,
        },
        payload,
    )
}

fn encoded(h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode(h, payload, &mut out).unwrap();
    out
}

fn apply_model(disk: &mut [u8], h: &Header, payload: &[u8]) {
    let r = h.offset as usize..(h.offset + h.len) as usize;
    match h.kind {
        Kind::Write => disk[r].copy_from_slice(payload),
        Kind::Zero | Kind::Discard => disk[r].fill(0),
    }
}

// ------------------------------------------------------------------ control files

fn random_sync(rng: &mut StdRng) -> SyncFile {
    let pos = |rng: &mut StdRng| LogPos::new(rng.gen_range(1..50), rng.gen_range(0..1 << 30));
    SyncFile {
        start: rng.gen_bool(0.7).then(|| pos(rng)),
        done: rng.gen_range(0..1 << 40),
        size: rng.gen_range(0..1 << 40),
        end: rng.gen_bool(0.3).then(|| pos(rng)),
        transferred: rng.gen_range(0..1 << 40),
        from: rng
            .gen_bool(0.5)
            .then(|| HostName::new(["alpha", "beta", "c-3"][rng.gen_range(0..3)]).unwrap()),
    }
}

/// A sequence of writes and removals of every control file: every crash image reads back
/// (never torn, never unreadable) as the state before or after the operation that was running,
/// and every completed operation is in every later image.
#[test]
fn control_files_crash_images_are_before_or_after_each_operation() {
    let mut total = 0;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MemDir::new();
        d.capture_crash_images();
        let mut model = ControlState::default();
        let mut states = vec![model.clone()];
        let mut done_at = Vec::new();
        for _ in 0..200 {
            match rng.gen_range(0..10) {
                0 | 1 => {
                    let p = LogPos::new(rng.gen_range(1..100), rng.gen_range(0..1 << 30));
                    control::write_position(&d, p).unwrap();
                    model.position = Some(p);
                }
                2 => {
                    let s = random_sync(&mut rng);
                    control::write_sync(&d, &s).unwrap();
                    model.sync = Some(s);
                }
                3 => {
                    control::remove_sync(&d).unwrap();
                    model.sync = None;
                }
                4 => {
                    let why = format!("log {} is gone (reason {})", rng.gen::<u16>(), "x");
                    control::write_needs_sync(&d, &why).unwrap();
                    model.needs_sync = Some(why);
                }
                5 => {
                    control::remove_needs_sync(&d).unwrap();
                    model.needs_sync = None;
                }
                6..=8 => {
                    let m = Marker::ALL[rng.gen_range(0..3)];
                    let on = rng.gen_bool(0.5);
                    control::set_marker(&d, m, on).unwrap();
                    match m {
                        Marker::Replica => model.replica = on,
                        Marker::ForcePrimary => model.force_primary = on,
                        Marker::Emergency => model.emergency = on,
                    }
                }
                _ => {
                    let no = rng.gen_range(1..1000);
                    control::write_chain_start(&d, no).unwrap();
                    model.chain_start = Some(no);
                }
            }
            states.push(model.clone());
            done_at.push(d.sync_points());
        }
        let images = d.take_crash_images();
        assert!(images.len() >= 200, "only {} images", images.len());
        for img in &images {
            let c = completed(&done_at, img);
            let got = control::read_all(&MemDir::from_image(img)).unwrap_or_else(|e| {
                panic!("seed {seed} sync point {}: unreadable: {e}", img.sync_point)
            });
            assert!(
                got == states[c] || states.get(c + 1) == Some(&got),
                "seed {seed} sync point {} (after {c} operations): {got:?}\nbefore: {:?}\nafter: {:?}",
                img.sync_point,
                states[c],
                states.get(c + 1)
            );
        }
        assert_eq!(control::read_all(&d).unwrap(), model);
        total += images.len();
    }
    eprintln!("control files: {total} crash images checked");
}

// ------------------------------------------------------------------ copies

#[derive(Debug, Clone, PartialEq, Eq)]
struct MCopy {
    /// Every byte appended (durable first, then not yet synced).
    content: Vec<u8>,
    /// Durable length: every later image must hold at least this much.
    durable: u64,
    /// Record boundaries (ends), in order.
    bounds: Vec<u64>,
}

type Model = BTreeMap<u64, MCopy>;

/// Does the reopened image `d` (copies `c`) fit the model: the same copies, each with at least
/// its durable bytes, and nothing but a prefix of what was appended?
fn fits(c: &Copies, d: &MemDir, m: &Model) -> Result<(), String> {
    let got: Vec<u64> = c.files().keys().copied().collect();
    let want: Vec<u64> = m.keys().copied().collect();
    if got != want {
        return Err(format!("copies {got:?}, model {want:?}"));
    }
    for (no, mc) in m {
        let info = c.get(*no).expect("listed");
        let raw = d
            .contents(&LogName::new(*no, alpha()).to_string())
            .unwrap_or_default();
        if raw.len() as u64 != info.len {
            return Err(format!(
                "copy {no}: {} bytes but len {}",
                raw.len(),
                info.len
            ));
        }
        if info.len < mc.durable {
            return Err(format!(
                "copy {no}: {} bytes, {} were durable",
                info.len, mc.durable
            ));
        }
        if raw.len() > mc.content.len() || raw[..] != mc.content[..raw.len()] {
            return Err(format!("copy {no}: bytes differ from what was appended"));
        }
    }
    Ok(())
}

/// Appends verified chunks, syncs, opens the next copy, reopens the newest for appending,
/// reclaims, repairs and removes everything, in random order: after `sync` returned a durable
/// length L, every later image reopens to at least L verified bytes of that copy (a torn tail
/// beyond is cut on open, also one added to the image by hand); removals and cuts are in every
/// image after they returned; and no image has a gap that makes `open` discard copies.
#[test]
fn copies_crash_images_keep_every_durable_byte() {
    let mut total = 0;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(100 + seed);
        let d = MemDir::new();
        d.capture_crash_images();
        let (mut c, _) = Copies::open(Arc::new(d.clone())).unwrap();
        let mut model = Model::new();
        // States each operation may pass through, the last one is where it ends.
        let mut ops: Vec<Vec<Model>> = Vec::new();
        let mut done_at = Vec::new();
        let mut cur: Option<(u64, CopyAppender)> = None;
        let mut next_no = 1u64;
        for _ in 0..600 {
            let mut passes = Vec::new();
            match rng.gen_range(0..20) {
                // Append a chunk of whole records to the newest copy.
                0..=8 => {
                    let (no, app) = match cur.as_mut() {
                        Some(x) => x,
                        None => {
                            let no = c.newest().unwrap_or(next_no);
                            let app = c.append(no, &alpha()).unwrap();
                            let m = model.entry(no).or_insert(MCopy {
                                content: Vec::new(),
                                durable: 0,
                                bounds: Vec::new(),
                            });
                            // Reopening cut what was never synced.
                            m.content.truncate(m.durable as usize);
                            while m.bounds.last().is_some_and(|b| *b > m.durable) {
                                m.bounds.pop();
                            }
                            assert_eq!(app.end(), m.durable);
                            passes.push(model.clone());
                            cur.insert((no, app))
                        }
                    };
                    let m = model.get_mut(no).expect("modelled");
                    let mut chunk = Vec::new();
                    for _ in 0..rng.gen_range(1..4) {
                        let seq = app.next_seq() + chunk_records(&chunk);
                        let (h, p) = record(&mut rng, seq, 512);
                        chunk.extend(encoded(&h, &p));
                    }
                    let at = app.end();
                    app.append(at, &chunk).unwrap();
                    let mut end = at;
                    for r in split_records(&chunk) {
                        end += r as u64;
                        m.bounds.push(end);
                    }
                    m.content.extend_from_slice(&chunk);
                }
                // Make the current copy durable.
                9..=12 => {
                    if let Some((no, app)) = &mut cur {
                        let len = app.sync().unwrap();
                        assert!(c.note_durable(*no, len));
                        model.get_mut(no).expect("modelled").durable = len;
                    }
                }
                // The next logfile arrives: the current one is made durable first.
                13 => {
                    if let Some((no, mut app)) = cur.take() {
                        let len = app.sync().unwrap();
                        c.note_durable(no, len);
                        model.get_mut(&no).expect("modelled").durable = len;
                        passes.push(model.clone());
                        let app = c.append(no + 1, &alpha()).unwrap();
                        model.insert(
                            no + 1,
                            MCopy {
                                content: Vec::new(),
                                durable: 0,
                                bounds: Vec::new(),
                            },
                        );
                        cur = Some((no + 1, app));
                    }
                }
                // A fetch session ends and the next one reopens the newest copy.
                14 => {
                    cur = None;
                }
                // Reclamation below some copy (the newest stays).
                15 | 16 => {
                    if let (Some(lo), Some(hi)) = (c.oldest(), c.newest()) {
                        let below = rng.gen_range(lo..=hi);
                        let removed = c.remove_below(below).unwrap();
                        assert_eq!(removed.len() as u64, below - lo);
                        for no in lo..below {
                            model.remove(&no);
                            passes.push(model.clone());
                        }
                    }
                }
                // Repair: cut some copy at a record boundary within its durable bytes.
                17 | 18 => {
                    let nos: Vec<u64> = model.keys().copied().collect();
                    if !nos.is_empty() {
                        let no = nos[rng.gen_range(0..nos.len())];
                        let m = &model[&no];
                        let mut choices = vec![0];
                        choices.extend(m.bounds.iter().filter(|b| **b <= m.durable));
                        let off = choices[rng.gen_range(0..choices.len())];
                        cur = None;
                        let removed = c.truncate(LogPos::new(no, off)).unwrap();
                        assert_eq!(
                            removed.iter().map(|n| n.no).collect::<Vec<_>>(),
                            nos.iter().copied().filter(|n| *n > no).collect::<Vec<_>>()
                        );
                        model.retain(|n, _| *n <= no);
                        passes.push(model.clone());
                        let m = model.get_mut(&no).expect("kept");
                        m.content.truncate(off as usize);
                        m.durable = off;
                        m.bounds.retain(|b| *b <= off);
                    }
                }
                // Invalidate: everything goes; fetching restarts at a later number.
                _ => {
                    cur = None;
                    c.remove_all().unwrap();
                    next_no = model.keys().next_back().map_or(1, |n| n + 3);
                    model.clear();
                }
            }
            passes.push(model.clone());
            ops.push(passes);
            done_at.push(d.sync_points());
        }
        let images = d.take_crash_images();
        assert!(images.len() > 150, "only {} images", images.len());
        let initial = Model::new();
        for img in &images {
            let k = completed(&done_at, img);
            let before = if k == 0 {
                &initial
            } else {
                ops[k - 1].last().expect("one state")
            };
            let allowed: Vec<&Model> = std::iter::once(before)
                .chain(ops.get(k).into_iter().flatten())
                .collect();
            for torn in [None, Some(false), Some(true)] {
                let cd = MemDir::from_image(img);
                if let Some(garbage) = torn {
                    add_torn_tail(&cd, &mut rng, garbage);
                }
                let (copies, report) = Copies::open(Arc::new(cd.clone())).unwrap_or_else(|e| {
                    panic!("seed {seed} sync point {}: open: {e}", img.sync_point)
                });
                assert_eq!(
                    report.discarded, None,
                    "seed {seed} sync point {}",
                    img.sync_point
                );
                let verdicts: Vec<_> = allowed.iter().map(|m| fits(&copies, &cd, m)).collect();
                assert!(
                    verdicts.iter().any(Result::is_ok),
                    "seed {seed} sync point {} (after {k} operations, torn {torn:?}): {verdicts:?}",
                    img.sync_point
                );
            }
        }
        total += images.len();
    }
    eprintln!("copies: {total} crash images checked, each also with two kinds of torn tail");
}

fn chunk_records(chunk: &[u8]) -> u64 {
    split_records(chunk).len() as u64
}

/// Lengths of the records in a buffer of whole records.
fn split_records(buf: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let h = mars_txlog::format::decode(&buf[at..]).unwrap();
        out.push(h.record_len());
        at += h.record_len();
    }
    out
}

/// Appends to the newest copy of an image what a crash in the middle of a write leaves: the
/// start of a record (`garbage` false) or random bytes.
fn add_torn_tail(d: &MemDir, rng: &mut StdRng, garbage: bool) {
    let Some(newest) = d
        .list()
        .unwrap()
        .iter()
        .filter_map(|n| LogName::parse(n).ok().flatten())
        .max()
    else {
        return;
    };
    let f = d.open(&newest.to_string(), OpenMode::Existing).unwrap();
    let len = f.len().unwrap();
    let tail = if garbage {
        (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect()
    } else {
        let (h, p) = record(rng, 1_000_000, 512);
        let r = encoded(&h, &p);
        r[..rng.gen_range(1..r.len())].to_vec()
    };
    f.write_at(&tail, len).unwrap();
    f.sync_data().unwrap();
}

// ------------------------------------------------------------------ replay

struct Logged {
    /// Every record in log order: its copy, end offset, header and payload.
    records: Vec<(u64, u64, Header, Vec<u8>)>,
    /// Copy number → length.
    lens: BTreeMap<u64, u64>,
}

impl Logged {
    /// How many records lie before `pos`.
    fn count_before(&self, pos: LogPos) -> usize {
        self.records
            .iter()
            .take_while(|(no, end, _, _)| LogPos::new(*no, *end) <= pos)
            .count()
    }
}

/// Writes `files` copies of `per_file` random records each (all durable) into `d`.
fn write_copies(d: &MemDir, rng: &mut StdRng, files: u64, per_file: u64) -> Logged {
    let (mut c, _) = Copies::open(Arc::new(d.clone())).unwrap();
    let mut out = Logged {
        records: Vec::new(),
        lens: BTreeMap::new(),
    };
    for no in 1..=files {
        let mut app = c.append(no, &alpha()).unwrap();
        for seq in 1..=per_file {
            let (h, p) = record(rng, seq, 2048);
            let at = app.end();
            app.append(at, &encoded(&h, &p)).unwrap();
            out.records.push((no, app.end(), h, p));
        }
        let len = app.sync().unwrap();
        c.note_durable(no, len);
        out.lens.insert(no, len);
    }
    out
}

fn mem_disk(d: &MemDir) -> Arc<dyn File> {
    let f = d.open("disk", OpenMode::Create).unwrap();
    f.set_len(DISK).unwrap();
    f.sync_data().unwrap();
    d.sync().unwrap();
    f
}

fn hash(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Replay in steps of random size, small batches and random stops: in every crash image the
/// disk equals the model after some number of records that is at least what the persisted
/// position claims (the disk is synced before the position), and replaying the image from its
/// persisted position reproduces the final disk.
#[test]
fn replay_crash_images_never_claim_more_than_the_disk_holds() {
    let mut total = 0;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(200 + seed);
        let d = MemDir::new();
        let disk = mem_disk(&d);
        let files = 4;
        let log = write_copies(&d, &mut rng, files, 40);
        // The disk after each number of records, by hash.
        let mut model = vec![0u8; DISK as usize];
        let mut states: HashMap<u64, Vec<usize>> = HashMap::new();
        states.entry(hash(&model)).or_default().push(0);
        for (i, (_, _, h, p)) in log.records.iter().enumerate() {
            apply_model(&mut model, h, p);
            states.entry(hash(&model)).or_default().push(i + 1);
        }
        let last = model;
        control::write_position(&d, LogPos::new(1, 0)).unwrap();
        d.capture_crash_images();
        let mut pos = LogPos::new(1, 0);
        let mut persisted = Vec::new();
        while pos.file <= files {
            let len = log.lens[&pos.file];
            if pos.offset == len {
                pos = LogPos::new(pos.file + 1, 0);
                control::write_position(&d, pos).unwrap();
                continue;
            }
            let bounds: Vec<u64> = log
                .records
                .iter()
                .filter(|(no, end, _, _)| *no == pos.file && *end > pos.offset)
                .map(|(_, end, _, _)| *end)
                .collect();
            let to = bounds[rng.gen_range(0..bounds.len())];
            let mut r = Replay::new(&d, &*disk, DISK);
            r.batch = rng.gen_range(2048..8192);
            r.check = 1024;
            let name = LogName::new(pos.file, alpha());
            let mut stop_rng = StdRng::seed_from_u64(rng.gen());
            let got = r
                .apply(
                    &name,
                    pos.offset,
                    to,
                    &mut || stop_rng.gen_bool(0.1),
                    &mut |ev| {
                        if let ReplayEvent::Persisted(p) = ev {
                            persisted.push(p);
                        }
                    },
                )
                .unwrap();
            assert!(got > pos && got <= LogPos::new(pos.file, to));
            assert_eq!(persisted.last(), Some(&got));
            pos = got;
        }
        assert!(persisted.windows(2).all(|w| w[0] < w[1]));
        let images = d.take_crash_images();
        assert!(images.len() > 50, "only {} images", images.len());
        for img in &images {
            let cd = MemDir::from_image(img);
            let p = control::read_position(&cd).unwrap().expect("persisted");
            let raw = cd.contents("disk").unwrap();
            let claimed = log.count_before(p);
            let ok = states
                .get(&hash(&raw))
                .is_some_and(|ks| ks.iter().any(|k| *k >= claimed));
            assert!(
                ok,
                "seed {seed} sync point {}: the position {p} claims {claimed} records, the disk \
                 is no state at or after them",
                img.sync_point
            );
            // Reopen and replay from the persisted position: the full result.
            let (copies, report) = Copies::open(Arc::new(cd.clone())).unwrap();
            assert_eq!(report, Default::default());
            let cdisk = cd.open("disk", OpenMode::Existing).unwrap();
            let r = Replay::new(&cd, &*cdisk, DISK);
            for (no, info) in copies.files().range(p.file..) {
                let from = if *no == p.file { p.offset } else { 0 };
                r.apply(
                    &LogName::new(*no, alpha()),
                    from,
                    info.len,
                    &mut || false,
                    &mut |_| {},
                )
                .unwrap();
            }
            assert!(
                cd.contents("disk").unwrap() == last,
                "seed {seed} sync point {}: replay from {p} does not reproduce the disk",
                img.sync_point
            );
        }
        total += images.len();
    }
    eprintln!("replay: {total} crash images checked");
}

/// Damage in the middle of a copy: replay stops with the offset of the damaged record, and
/// the persisted position stays before it.
#[test]
fn replay_reports_damage_with_its_offset() {
    let mut rng = StdRng::seed_from_u64(7);
    let d = MemDir::new();
    let disk = mem_disk(&d);
    let log = write_copies(&d, &mut rng, 1, 10);
    let name = LogName::new(1, alpha());
    let f = d.open(&name.to_string(), OpenMode::Existing).unwrap();
    let bad_at = log.records[4].1; // the end of record 5 = the start of record 6
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, bad_at + 20).unwrap();
    f.write_at(&[b[0] ^ 0x40], bad_at + 20).unwrap();
    let mut r = Replay::new(&d, &*disk, DISK);
    r.batch = 1;
    let e = r
        .apply(&name, 0, log.lens[&1], &mut || false, &mut |_| {})
        .unwrap_err();
    assert_eq!(e.damage_offset(), Some(bad_at), "{e}");
    assert_eq!(
        control::read_position(&d).unwrap(),
        Some(LogPos::new(1, bad_at))
    );
}

/// A record that writes beyond the device (an intact record of some other device's log, or
/// one of a resize the replica has not heard of yet) is not applied: replay stops before it,
/// with everything before it applied and the position persisted right before it.
#[test]
fn replay_stops_before_a_record_beyond_the_device() {
    let mut rng = StdRng::seed_from_u64(11);
    let d = MemDir::new();
    let disk = mem_disk(&d);
    let log = write_copies(&d, &mut rng, 1, 40);
    let name = LogName::new(1, alpha());
    let size = DISK / 2;
    let first_beyond = log
        .records
        .iter()
        .position(|(_, _, h, _)| h.offset + h.len > size)
        .expect("some record writes into the upper half");
    let at = first_beyond.checked_sub(1).map_or(0, |i| log.records[i].1);
    let mut r = Replay::new(&d, &*disk, size);
    r.batch = 1 << 30;
    let e = r
        .apply(&name, 0, log.lens[&1], &mut || false, &mut |_| {})
        .unwrap_err();
    match &e {
        mars_replica::Error::BeyondDevice {
            at: got, size: s, ..
        } => {
            assert_eq!((*got, *s), (at, size), "{e}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        e.damage_offset(),
        None,
        "not damage: fetching it again cannot help"
    );
    if at > 0 {
        assert_eq!(
            control::read_position(&d).unwrap(),
            Some(LogPos::new(1, at))
        );
    }
    // The disk holds exactly the records before it.
    let mut model = vec![0u8; DISK as usize];
    for (_, _, h, p) in &log.records[..first_beyond] {
        apply_model(&mut model, h, p);
    }
    assert!(d.contents("disk").unwrap() == model);
}

// ------------------------------------------------------------------ promotion cut

fn log_files(d: &MemDir) -> BTreeMap<String, Vec<u8>> {
    d.list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("log-") && !n.ends_with(".tmp"))
        .map(|n| {
            let c = d.contents(&n).unwrap();
            (n, c)
        })
        .collect()
}

/// The cut before a promotion, crashed at every sync point. The rule: every image, reopened,
/// is the old copies (and old position), or the old copies without those after the position,
/// or the cut copies; never a shortened copy followed by a later one; the position file is
/// never anything but the old one or the cut position; and repeating the cut from the image
/// gives exactly the cut result.
#[test]
fn promotion_cut_crash_images_are_old_or_cut_and_repeating_finishes_it() {
    let mut total = 0;
    let mut rng = StdRng::seed_from_u64(300);
    let d0 = MemDir::new();
    let log = write_copies(&d0, &mut rng, 4, 12);
    let mid = log.records[12 + 5].1; // a record boundary inside copy 2
    let cases = [
        (Some(LogPos::new(2, mid)), LogPos::new(2, mid)),
        (Some(LogPos::new(2, 0)), LogPos::new(2, 0)),
        (
            Some(LogPos::new(3, log.lens[&3])),
            LogPos::new(3, log.lens[&3]),
        ),
        (
            Some(LogPos::new(4, log.lens[&4])),
            LogPos::new(4, log.lens[&4]),
        ),
        // No position persisted yet: replay's position is the start of the oldest copy.
        (None, LogPos::new(1, 0)),
    ];
    for (before, at) in cases {
        let d = MemDir::from_image(&d0.crash_image());
        if let Some(p) = before {
            control::write_position(&d, p).unwrap();
        }
        // Fetched bytes that were never synced lie beyond the newest copy's durable end.
        let newest = d.open("log-000000004-alpha", OpenMode::Existing).unwrap();
        newest.write_at(b"MaRs-unsynced", log.lens[&4]).unwrap();
        let old = log_files(&MemDir::from_image(&d.crash_image()));
        d.capture_crash_images();
        let (mut c, _) = Copies::open(Arc::new(d.clone())).unwrap();
        c.cut_for_promotion(at).unwrap();
        let images = d.take_crash_images();
        let cut = log_files(&d);
        assert_eq!(control::read_position(&d).unwrap(), Some(at));
        let later_removed: BTreeMap<_, _> = old
            .iter()
            .filter(|(n, _)| LogName::parse(n).unwrap().unwrap().no <= at.file)
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        assert!(!images.is_empty());
        for img in &images {
            let cd = MemDir::from_image(img);
            let pos = control::read_position(&cd).unwrap();
            assert!(pos == before || pos == Some(at), "position {pos:?}");
            let (mut copies, report) = Copies::open(Arc::new(cd.clone())).unwrap();
            assert_eq!(report.discarded, None);
            let files = log_files(&cd);
            assert!(
                files == old || files == later_removed || files == cut,
                "at {at} sync point {}: {:?}",
                img.sync_point,
                files.keys().collect::<Vec<_>>()
            );
            copies.cut_for_promotion(at).unwrap();
            assert_eq!(log_files(&cd), cut, "at {at}: repeating the cut");
            assert_eq!(control::read_position(&cd).unwrap(), Some(at));
        }
        total += images.len();
    }
    eprintln!("promotion cut: {total} crash images checked");
}

/// The same for sync progress: `sync.toml`'s `done` never claims chunks that are not durable
/// on the disk.
#[test]
fn sync_progress_never_runs_ahead_of_the_disk() {
    use mars_replica::sync;
    let d = MemDir::new();
    let disk = mem_disk(&d);
    let chunk = 4096u64;
    let mut sf = SyncFile::pending(0, DISK);
    control::write_sync(&d, &sf).unwrap();
    d.capture_crash_images();
    let data = |at: u64| vec![(at / chunk) as u8 + 1; chunk as usize];
    let mut at = 0;
    while at < DISK {
        sync::write_chunk(&*disk, at, &data(at)).unwrap();
        at += chunk;
        if (at / chunk).is_multiple_of(2) {
            sf.done = at;
            sync::persist(&d, &*disk, &sf).unwrap();
        }
    }
    let images = d.take_crash_images();
    assert!(images.len() >= 8);
    for img in &images {
        let cd = MemDir::from_image(img);
        let s = control::read_sync(&cd).unwrap().unwrap();
        let raw = cd.contents("disk").unwrap();
        let mut off = 0;
        while off < s.done {
            assert_eq!(
                raw[off as usize..(off + chunk) as usize],
                data(off)[..],
                "sync point {}: done {} but chunk {off} is not on the disk",
                img.sync_point,
                s.done
            );
            off += chunk;
        }
    }
    eprintln!("sync progress: {} crash images checked", images.len());
}
