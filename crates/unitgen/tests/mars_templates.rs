//! The generator run over a template directory of our own that uses every construct of MARS's
//! `systemd-testing/` and `systemd-icpu/` folders, for a resource whose name needs escaping.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use mars_unitgen::fs::{load_templates, write_generated};
use mars_unitgen::generate::{
    Config, Generation, Generator, TargetDir, WantedUnit, DEFAULT_WATCHER_UNITS,
};
use mars_unitgen::macros::Vars;
use mars_unitgen::markers::Markers;
use mars_unitgen::{Template, TemplateSet};

const RES: &str = "my-res";

fn host_vars() -> Vars {
    [
        ("host", "node1"),
        ("mars", "/mars"),
        ("ip", "10.0.0.1"),
        ("cmd", "systemd-trigger"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Our template directory, with paths and mtimes made deterministic for exact comparisons.
fn our_templates() -> TemplateSet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/templates");
    let loaded = load_templates(std::slice::from_ref(&dir)).unwrap();
    let list = loaded
        .iter()
        .map(|t| Template {
            path: format!("/tpl/{}", t.name),
            mtime: 1_700_000_000,
            ..t.clone()
        })
        .collect();
    TemplateSet::new(list).unwrap()
}

/// What `systemd-trigger-extern RES` generates after `set-systemd-unit RES <marker>`.
fn run(set: &TemplateSet, config: &Config, resources: &[&str], marker: &str) -> Generation {
    let resources: Vec<String> = resources.iter().map(|s| s.to_string()).collect();
    let generator = Generator::new(set, config, host_vars(), resources.clone());
    let mut wanted = Vec::new();
    for res in &resources {
        let choice = generator.choose_units(res, marker, None).unwrap();
        for unit in [choice.start, choice.stop] {
            wanted.push(WantedUnit {
                res: res.clone(),
                unit,
            });
        }
        for unit in generator
            .watcher_units(res, &DEFAULT_WATCHER_UNITS)
            .unwrap()
        {
            wanted.push(WantedUnit {
                res: res.clone(),
                unit,
            });
        }
    }
    generator.generate(&wanted).unwrap()
}

fn config(out: &Path) -> Config {
    Config {
        unit_dir: out.join("units").display().to_string(),
        scripts_dir: out.join("scripts").display().to_string(),
        existing_units: BTreeSet::from(["mars.mount".to_string()]),
        ..Config::default()
    }
}

fn names(g: &Generation) -> Vec<&str> {
    g.files.iter().map(|f| f.name.as_str()).collect()
}

/// The global units every run produces (plain templates).
const GLOBAL: [&str; 9] = [
    "daemon-reload.service",
    "mars-emergency.path",
    "mars-emergency.service",
    "mars-trigger.path",
    "mars-trigger.service",
    "mars.path",
    "mars.service",
    "mars-my\\x2dres-trigger.path",
    "mars-my\\x2dres-trigger.service",
];

fn expect_files(g: &Generation, extra: &[&str]) {
    let mut want: Vec<&str> = GLOBAL.iter().chain(extra).copied().collect();
    want.sort_by(|a, b| mars_unitgen::generate::natural_cmp(a, b));
    assert_eq!(names(g), want);
    // `RequiresMountsFor=/mars/uuid` refers to `mars-uuid` (MARS escapes path references
    // without adding a suffix); `mars.mount` is provided by the system.
    assert_eq!(g.unresolved, ["mars-uuid"]);
    assert_eq!(g.existing, ["mars.mount"]);
    assert!(g.warnings.is_empty());
}

#[test]
fn default_marker_picks_the_script() {
    let set = our_templates();
    assert!(set.check().is_empty(), "{:?}", set.check());
    let g = run(&set, &config(Path::new("/out")), &[RES], "DEFAULT");
    expect_files(&g, &["mnt-test-my\\x2dres-testload.script"]);
    let script = g.get("mnt-test-my\\x2dres-testload.script").unwrap();
    assert_eq!(script.dir, TargetDir::Scripts);
    assert_eq!(
        script.path,
        "/out/scripts/mnt-test-my\\x2dres-testload.script"
    );
    assert_eq!(
        script.content,
        r#"#!/bin/bash
### GENERATED FROM: /tpl/mnt-test-@escvar{res}-testload.script
### GENERATED NAME: mnt-test-my\x2dres-testload.script
### GENERATED   TO: /out/scripts/mnt-test-my\x2dres-testload.script
### TEMPLATE MTIME: 1700000000
###
###   REF: mars-my\x2dres-trigger.path
###   REF: mars-my\x2dres-trigger.service
###

# Markers:
# DEFAULT_START
# DEFAULT_STOP
#
# ALSO=mars-my\x2dres-trigger.path
# ALSO=mars-my\x2dres-trigger.service

op="$1"
dev=/dev/mars/my-res
mnt=/mnt/test/my-res

case "$op" in
start) mountpoint -q "$mnt" || { mkdir -p "$mnt"; mount "$dev" "$mnt"; } ;;
stop)  ! mountpoint -q "$mnt" || umount "$mnt" ;;
*)     echo "ignoring '$op' (slot 2)" ;;
esac
"#
    );
    let m = &script.markers;
    assert_eq!(m.start, BTreeSet::from(["DEFAULT".to_string()]));
    assert_eq!(m.stop, BTreeSet::from(["DEFAULT".to_string()]));
    assert_eq!(
        m.also,
        [
            "mars-my\\x2dres-trigger.path".to_string(),
            "mars-my\\x2dres-trigger.service".to_string()
        ]
    );
    assert!(!m.always_start && !m.keep_running && !m.always_disabled);
    let watcher = g.get("mars-my\\x2dres-trigger.path").unwrap();
    assert!(watcher.markers.always_start);
    assert!(watcher
        .content
        .contains("PathExists=/mars/resource-my-res/systemd-trigger\n"));
    assert!(watcher
        .content
        .contains("Unit=mars-my\\x2dres-trigger.service\n"));
    let trigger = g.get("mars-my\\x2dres-trigger.service").unwrap();
    assert!(trigger
        .content
        .contains("Description=Test: trigger for resource my-res on node1\n"));
    assert!(trigger
        .content
        .contains("ExecStart=/bin/true systemd-trigger-extern my-res\n"));
    assert_eq!(
        trigger.refs,
        [
            "daemon-reload.service",
            "mars-trigger.service",
            "mars.service"
        ]
    );
    let mars = g.get("mars.service").unwrap();
    assert_eq!(
        mars.refs,
        ["mars.mount", "mars-uuid", "network-online.target"]
    );
    assert_eq!(mars.resource, "UNDEFINED_RESOURCE");
}

#[test]
fn testing_marker_follows_the_delay_pattern() {
    let set = our_templates();
    let g = run(&set, &config(Path::new("/out")), &["other", RES], "TESTING");
    let mut extra = vec![
        "mnt-test-my\\x2dres-delay.service",
        "mnt-test-my\\x2dres-testload.service",
        "mnt-test-my\\x2dres.mount",
        "mnt-test-other-delay.service",
        "mnt-test-other-testload.service",
        "mnt-test-other.mount",
        "mars-other-trigger.path",
        "mars-other-trigger.service",
    ];
    extra.sort();
    expect_files(&g, &extra);
    let delay = g.get("mnt-test-my\\x2dres-delay.service").unwrap();
    // Resolved through the closure: `other` was tried first and did not match.
    assert_eq!(delay.resource, RES);
    assert_eq!(
        delay.content,
        r"### GENERATED FROM: /tpl/^{mntname}-@escvar{res}-delay.service
### GENERATED NAME: mnt-test-my\x2dres-delay.service
### GENERATED   TO: /out/units/mnt-test-my\x2dres-delay.service
### TEMPLATE MTIME: 1700000000
###
###   REF: mnt-test-my\x2dres.mount
###   REF: mars.service
###

[Unit]
Description=Test delay on /mnt/test/my-res (pattern mnt-test)
BindsTo=mnt-test-my\x2dres.mount
After=mnt-test-my\x2dres.mount
PartOf=mnt-test-my\x2dres.mount
ConditionPathIsMountPoint=/mnt/test/my-res

[Service]
Type=oneshot
RemainAfterExit=yes
KillMode=none
ExecStart=/bin/true
ExecStop=/bin/true

[Install]
WantedBy=mars.service
"
    );
    let mount = g.get("mnt-test-my\\x2dres.mount").unwrap();
    assert_eq!(
        mount.refs,
        ["mars.service", "daemon-reload.service", "umount.target"]
    );
    assert!(mount
        .content
        .contains("\nWhat=/dev/mars/my-res\nWhere=/mnt/test/my-res\n"));
    assert!(mount
        .content
        .contains("\nConditionPathIsSymbolicLink=/mars/resource-my-res/systemd-want\n"));
    assert!(mount
        .content
        .contains("\nConditionPathIsMountPoint=!/mnt/test/my-res\n"));
    assert!(!mount.markers.keep_running, "## disables a marker");
    assert_eq!(mount.markers.start, BTreeSet::from(["MOUNTED".to_string()]));
    assert_eq!(
        mount.markers.stop,
        BTreeSet::from(["MOUNTED".to_string(), "TESTING".to_string()])
    );
    let load = g.get("mnt-test-my\\x2dres-testload.service").unwrap();
    assert_eq!(
        load.refs,
        [
            "daemon-reload.service",
            "mnt-test-my\\x2dres-delay.service",
            "mars.service"
        ]
    );
}

#[test]
fn app_marker_script_with_keep_running_and_macros() {
    let set = our_templates();
    let g = run(&set, &config(Path::new("/out")), &[RES], "APP");
    expect_files(&g, &["app-my\\x2dres.script"]);
    let app = g.get("app-my\\x2dres.script").unwrap();
    assert!(app.markers.keep_running);
    let body = app.content.split("###\n\n").nth(1).unwrap();
    assert_eq!(
        body,
        r#"# Our adapter example: not stopped when it disappears.
# APP_START
# APP_STOP
# KEEP_RUNNING
# ALSO=mars-my\x2dres-trigger.path
# ALSO=mars-my\x2dres-trigger.service
want="$(stat --printf="%Y\n" /mars/resource-my-res/systemd-want)"
args=("$@")
echo "${args[@]}" "${#args[@]}" @ {not a macro} user@host

echo "size=20 big=yes tag=MY_RES esc=srv-a\x20b"
exit 0
"#
    );
}

/// `systemd-analyze verify` on every generated unit (not the `.script`s, which are MARS's
/// pseudo-units). Our templates use `/bin/true` so that verify finds their executables;
/// `mars.mount` is a system unit in real life, so a stub stands in for it. `KillMode=none`
/// (which MARS's units use on purpose) only produces a deprecation warning.
#[test]
fn systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("skipping: {} not found", analyze.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let probe = tmp.path().join("probe.service");
    std::fs::write(&probe, "[Service]\nType=oneshot\nExecStart=/bin/true\n").unwrap();
    let probe_ok = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&probe)
        .output();
    if !probe_ok.as_ref().is_ok_and(|o| o.status.success()) {
        // Some containers cannot run the verifier at all (no /proc, seccomp, …).
        eprintln!("skipping: systemd-analyze verify does not work here: {probe_ok:?}");
        return;
    }
    let set = our_templates();
    for (marker, resources) in [
        ("TESTING", vec!["other", RES]),
        ("DEFAULT", vec![RES]),
        ("APP", vec![RES]),
    ] {
        let out = tmp.path().join(marker);
        let g = run(&set, &config(&out), &resources, marker);
        write_generated(&g.files).unwrap();
        let units = out.join("units");
        std::fs::write(
            units.join("mars.mount"),
            "[Mount]\nWhat=tmpfs\nWhere=/mars\nType=tmpfs\n",
        )
        .unwrap();
        let paths: Vec<PathBuf> = g
            .files
            .iter()
            .filter(|f| f.dir == TargetDir::Units)
            .map(|f| PathBuf::from(&f.path))
            .collect();
        let output = Command::new(analyze)
            .args(["verify", "--man=no", "--generators=no"])
            .args(&paths)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("KillMode=none"))
            .collect();
        assert!(
            output.status.success() && complaints.is_empty(),
            "{marker}: {stderr}"
        );
    }
}

/// Runs the generator over a real template directory, e.g. a checkout of MARS's
/// `systemd-testing/` or `systemd-icpu/`: `MARS_TEMPLATES_DIR=/path/a:/path/b cargo test -p
/// mars-unitgen --test mars_templates external -- --nocapture`. Every start marker found is
/// tried for two resources, one with an awkward name.
#[test]
fn external_template_dir() {
    let Ok(dirs) = std::env::var("MARS_TEMPLATES_DIR") else {
        eprintln!("skipping: set MARS_TEMPLATES_DIR to a template directory to run this test");
        return;
    };
    for dir in dirs.split(':').filter(|d| !d.is_empty()) {
        let set = load_templates(&[PathBuf::from(dir)]).unwrap();
        assert!(!set.is_empty(), "{dir}: no templates found");
        assert!(set.check().is_empty(), "{:?}", set.check());
        let mut markers: BTreeSet<String> = set
            .iter()
            .flat_map(|t| Markers::parse(&t.text).start)
            .collect();
        markers.insert(String::new()); // no start unit: only plain templates and watchers
        for marker in &markers {
            let tmp = tempfile::tempdir().unwrap();
            let resources = ["my-res", "r2"];
            let g = if marker.is_empty() {
                let cfg = config(tmp.path());
                let gen = Generator::new(
                    &set,
                    &cfg,
                    host_vars(),
                    resources.map(String::from).to_vec(),
                );
                let wanted: Vec<WantedUnit> = resources
                    .iter()
                    .flat_map(|r| {
                        gen.watcher_units(r, &DEFAULT_WATCHER_UNITS)
                            .unwrap()
                            .into_iter()
                            .map(|unit| WantedUnit {
                                res: r.to_string(),
                                unit,
                            })
                    })
                    .collect();
                gen.generate(&wanted).unwrap_or_else(|e| panic!("{e}"))
            } else {
                run(&set, &config(tmp.path()), &resources, marker)
            };
            let report = write_generated(&g.files).unwrap();
            assert_eq!(report.changed.len(), g.files.len());
            eprintln!(
                "{dir} marker '{marker}': {} files {:?}\n  unresolved {:?}, existing {:?}, warnings {:?}",
                g.files.len(),
                names(&g),
                g.unresolved,
                g.existing,
                g.warnings
            );
        }
    }
}

/// Byte-identical to MARS's perl marsadm (mars0.1astable177): `data/perl/tpl/` run through
/// `marsadm systemd-trigger-extern r1` on host `vm` (a fake `/mars` with
/// `resource-r1/systemd-start-unit -> app-r1.service`; `MARS_PATH` = the template directory,
/// which also holds the macro file `mymac.tpl`), its output in `data/perl/expected/` with the
/// paths and the mtime replaced by placeholders. The template uses every MARS variable, an
/// unset one, an unknown `@`-macro, `# ALSO=` spellings, a reference across a line end,
/// `%sprintf`, `%human-seconds`, a macro file, `%callstack` and `%{0}`.
#[test]
fn byte_identical_to_mars_perl() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/perl");
    let tpl = data.join("tpl");
    let set = load_templates(std::slice::from_ref(&tpl)).unwrap();
    assert!(set.check().is_empty(), "{:?}", set.check());
    let out = tempfile::tempdir().unwrap();
    let cfg = config(out.path());
    let vars = mars_unitgen::host_vars_with(
        "vm",
        "/mars",
        "10.0.0.1",
        &mars_unitgen::RunOptions {
            cmd: "systemd-trigger-extern".into(),
            ..Default::default()
        },
    );
    let generator = Generator::new(&set, &cfg, vars, vec!["r1".into()]);
    let g = generator
        .generate(&[WantedUnit {
            res: "r1".into(),
            unit: "app-r1.service".into(),
        }])
        .unwrap();
    let file = g.get("app-r1.service").unwrap();
    let expected = std::fs::read_to_string(data.join("expected/app-r1.service"))
        .unwrap()
        .replace("=TEMPLATES=", &tpl.display().to_string())
        .replace("=UNITS=", &cfg.unit_dir)
        .replace("=MTIME=", &file.mtime.to_string());
    assert_eq!(file.content, expected);
    assert_eq!(
        g.warnings,
        [
            "variable 'nope' is undefined",
            "systemd function 'foo' is undefined"
        ]
    );
    // MARS warns "cannot find any systemd template" for these.
    for u in [
        "UNDEFINED(nope)",
        "bar",
        "extra.service",
        "gap.service",
        "x-r1.service",
    ] {
        assert!(
            g.unresolved.contains(&u.to_string()),
            "{u}: {:?}",
            g.unresolved
        );
    }
}
