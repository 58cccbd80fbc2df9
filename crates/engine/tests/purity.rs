//! The engine stays pure: its dependencies are data crates only (no tokio, no sockets, no
//! storage), so that nothing in it can do I/O; clippy's `disallowed-methods` and
//! `disallowed-types` (`clippy.toml`) keep clocks, files and threads out of its code.

// This test reads the crate's own files; the engine's code may not.
#![allow(clippy::disallowed_methods)]

#[test]
fn the_engine_depends_only_on_pure_crates() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("Cargo.toml");
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_deps = l == "[dependencies]";
            continue;
        }
        if in_deps && !l.is_empty() && !l.starts_with('#') {
            deps.push(l.split([' ', '=']).next().unwrap_or("").to_string());
        }
    }
    let allowed = [
        "mars-config",
        "mars-txlog",
        "mars-wire",
        "serde",
        "serde_json",
        "xxhash-rust",
    ];
    let extra: Vec<&String> = deps
        .iter()
        .filter(|d| !allowed.contains(&d.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "the engine gained dependencies {extra:?}: it must stay free of I/O (allowed: {allowed:?})"
    );
    // mars-txlog is used for log positions and names only: no file of it is opened here.
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut stack = vec![std::path::PathBuf::from(src)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("read");
            for bad in [
                "mars_txlog::reader",
                "mars_txlog::writer",
                "LogReader",
                "Appender",
                "tokio",
            ] {
                assert!(
                    !text.contains(bad),
                    "{} uses {bad}: the engine does no I/O",
                    p.display()
                );
            }
        }
    }
}
