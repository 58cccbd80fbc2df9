//! MARS's systemd template generator (`marsadm systemd-trigger`), without side effects.
//!
//! MARS lets the administrator describe the stack on top of a replicated device (mount, NFS
//! export, container, …) as systemd unit *templates*. On every trigger, the generator turns
//! them into concrete units for the resources of this host, follows their references
//! transitively, and writes the result to `/run/systemd/system` (and `.script` pseudo-units to
//! `/etc/marsadm/systemd-generated-scripts`). This crate is that text transformation; only
//! [`fs`] reads templates and writes results.
//!
//! # The template language, in layers
//!
//! 1. **`@`-macros** ([`expand`]) in file names and bodies: `@{var}`, `@escvar{var}`,
//!    `@esc{text}` (both `systemd-escape --path`, see [`escape`]), `@eval{…}`.
//! 2. **The `%`-macro language** ([`macros`]) inside `@eval{…}`: `%let{v}{x}`, `%{v}`,
//!    `%subst{text}{regex}{repl}`, `%if{c}{a}{b}`, `%+{a}{b}`, `%=={a}{b}`, loops, … Variables
//!    set by `%let` are visible to later `@{v}`.
//! 3. **`^{var}` captures** in file names only: a template `^{mnt}-@escvar{res}-delay.service`
//!    provides every unit named `<anything>-my\x2dres-delay.service`, binding `mnt`.
//! 4. **Markers** ([`markers`], matched as MARS's prefix regex): `# ALWAYS_START`, `# KEEP_RUNNING`,
//!    `# ALWAYS_DISABLED`, `# <NAME>_START`, `# <NAME>_STOP`, `# ALSO=<unit>`.
//! 5. **References** ([`generate::scan_refs`]): `Requires=`, `After=`, `Unit=`, … and `# ALSO=`
//!    name units that are generated too, transitively ([`generate::Generator::generate`]).
//!
//! Variables: MARS's `make_env` set ([`generate::host_vars_with`]: `cmd`, `host`, `real_host`,
//! `mars`, `ip`, `timeout`, `threshold`, `window`, `stuck-seconds`, `keep-backup-hours`,
//! `keep-backup-seconds`, `force`, `dry-run`, `verbose`, `callstack`, `0`) plus `res` and
//! `resdir` per resource ([`generate::Generator::resource_vars`]). User macro files `NAME.tpl`
//! on the search path are loaded with the templates ([`fs::load_macros`]); MARS's view macros
//! are answered through a [`View`] the caller passes ([`view`]).
//!
//! Expansion is lenient where MARS's is: an unset variable becomes `UNDEFINED(var)` and an
//! unknown `@`-macro its body, with a warning. A truly malformed template (unclosed brace,
//! unknown `%`-macro, `%die`, …) is an error naming the file and line ([`TemplateError`]); a
//! generation run leaves that template out and still generates the others
//! ([`Generation::errors`]). No input makes the crate panic (tested with proptest); runaway
//! macro programs stop at [`macros::MAX_STEPS`], [`macros::MAX_DEPTH`] and
//! [`macros::MAX_LEN`].
//!
//! # Example
//!
//! ```
//! use mars_unitgen::{Config, Generator, Template, TemplateSet, Vars, WantedUnit};
//!
//! let templates = TemplateSet::new(vec![
//!     Template::new("mnt-@escvar{res}.mount", "[Mount]\nWhat=/dev/mars/@{res}\nWhere=/mnt/@{res}\n"),
//! ])
//! .unwrap();
//! let config = Config::default();
//! let vars = Vars::from([("host".to_string(), "node1".to_string())]);
//! let generator = Generator::new(&templates, &config, vars, vec!["my-res".into()]);
//! let wanted = [WantedUnit { res: "my-res".into(), unit: "mnt-my\\x2dres.mount".into() }];
//! let generation = generator.generate(&wanted).unwrap();
//! assert!(generation.files[0].content.ends_with("What=/dev/mars/my-res\nWhere=/mnt/my-res\n"));
//! ```

pub mod amount;
pub mod error;
pub mod escape;
pub mod expand;
pub mod fs;
pub mod generate;
pub mod macros;
pub mod markers;
pub mod names;
pub mod num;
pub mod sprintf;
pub mod view;

pub use amount::{Amounts, Job, Progress, Roles};
pub use error::{Error, EscapeError, ExpandError, Location, MacroError, TemplateError};
pub use escape::{escape, escape_path};
pub use expand::Expander;
pub use generate::{
    host_vars, host_vars_with, Config, GeneratedFile, Generation, Generator, Lookup, RunOptions,
    TargetDir, Template, TemplateSet, UnitChoice, WantedUnit,
};
pub use macros::{Context, Vars};
pub use markers::Markers;
pub use names::{check_file_name, check_unit_name, BadUnitName};
pub use view::{ResourceView, StateView, View};
