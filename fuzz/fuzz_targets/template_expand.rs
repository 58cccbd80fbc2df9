//! The systemd template language (`@`-macros, the `%`-macro language, `^{…}` captures) over
//! arbitrary text: expanding a body, evaluating `@eval{}` input, checking syntax and matching a
//! unit name against a pattern may fail but never panic, and runaway programs stop at the
//! language's step, depth and length limits. The input is split at the first NUL into the
//! template text and a wanted unit name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::Arc;

use mars_unitgen::expand::{check_syntax, is_pattern_name, Expander};
use mars_unitgen::Context;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (template, wanted) = text.split_once('\0').unwrap_or((&text, "mnt-r.mount"));
    let vars = [("res", "r"), ("host", "a"), ("resdir", "/mars/resource-r")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // One user macro file (MARS's `NAME.tpl`), so that calls into macro files are fuzzed too.
    let macros: BTreeMap<String, String> = [("m".to_string(), "%{0}<%{1}>%{m}".to_string())]
        .into_iter()
        .collect();
    let ctx = Context {
        macros: Arc::new(macros),
        view: None,
    };
    let _ = check_syntax(template, &ctx);
    let _ = Expander::with_context(vars, ctx).expand(template);
    let mut e = Expander::default();
    let _ = e.eval(template);
    if is_pattern_name(template) {
        let _ = e.match_name(template, wanted);
    }
});
