//! No input makes the generator panic: random templates, names and macro programs only ever
//! produce values or typed errors.

use mars_unitgen::expand::check_syntax;
use mars_unitgen::generate::scan_refs;
use mars_unitgen::{
    escape, escape_path, Config, Expander, Generator, Markers, Template, TemplateSet, Vars,
    WantedUnit,
};
use proptest::prelude::*;

/// Fragments that make the parsers' interesting paths likely, mixed with arbitrary text.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "@{", "@escvar{", "@esc{", "@eval{", "@bad{", "@", "^{", "^{x}", "{", "}", "}{", "\\",
            "\\n", "%", "%{", "%let{", "%append{", "%set{", "%+{", "%-{", "%*{", "%/{", "%%{",
            "%<<{", "%>>{", "%~{", "%min{", "%=={", "%<{", "%eq{", "%=~{", "%&&{", "%||{", "%!{",
            "%if{", "%elsif{", "%while{", "%until{", "%for{", "%foreach{", "%subst{", "%protect{",
            "%eval{", "%eval-down{", "%tmp{", "%length{", "%toupper{", "%die{", "%warn{",
            "%dump-vars{", "%nosuch{", "res", "x", "-", "/", "..", ".", "1", "0", "-1", "99999999999999999999",
            "1e300", "(", ")", "[", "*", "+", "$1", "${1}", "\n", "# ALWAYS_START\n", "# ALSO=",
            "After=", "RequiresMountsFor=/a/../b", "#!", "ä", " ", "++", "--", "g", "i", "q",
        ])
        .prop_map(str::to_string),
        1 => "\\PC{0,6}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 0..40).prop_map(|v| v.concat())
}

fn vars() -> Vars {
    Vars::from([
        ("res".to_string(), "my-res".to_string()),
        ("x".to_string(), "1".to_string()),
        ("host".to_string(), "n".to_string()),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn expanding_never_panics(t in text()) {
        let _ = Expander::new(vars()).expand(&t);
        let _ = Expander::new(vars()).eval(&t);
        let _ = check_syntax(&t, &mars_unitgen::Context::default());
        let _ = Markers::parse(&t);
        let _ = scan_refs(&t);
        let _ = escape(&t);
        let _ = escape_path(&t);
    }

    #[test]
    fn name_matching_never_panics(pattern in text(), wanted in text()) {
        let _ = Expander::new(vars()).match_name(&pattern, &wanted);
    }

    #[test]
    fn generating_never_panics(
        templates in prop::collection::vec((text(), text()), 0..5),
        wanted in prop::collection::vec(text(), 0..3),
    ) {
        let list: Vec<Template> = templates.iter().map(|(n, t)| Template::new(n, t)).collect();
        let Ok(set) = TemplateSet::new(list) else { return Ok(()) };
        let _ = set.check();
        let config = Config::default();
        let generator = Generator::new(&set, &config, vars(), vec!["my-res".into(), "b".into()]);
        let wanted: Vec<WantedUnit> =
            wanted.into_iter().map(|unit| WantedUnit { res: "my-res".into(), unit }).collect();
        let _ = generator.generate(&wanted);
        for w in &wanted {
            let _ = generator.choose_units("my-res", &w.unit, None);
        }
        let _ = generator.choose_units("my-res", "DEFAULT", Some("X"));
    }
}
