//! `marsadm demo`: a throw-away local mars host. Starts `marsd` in a temporary root with a
//! file-backed resource, writes and verifies data through real NBD clients when they are
//! installed, shows `view`, and prints how to use it. (The three-host replication demo arrives
//! with replication.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mars_api::{Reply, Request};
use mars_config::parse_size;

use crate::{client, Cli};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the demo resource.
    #[arg(long, default_value = "256M")]
    size: String,
    /// Stop and clean up after the walkthrough instead of serving until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

/// Finds `marsd`: next to this executable, else on PATH.
fn marsd_path() -> PathBuf {
    if let Ok(p) = std::env::var("MARSD") {
        return p.into();
    }
    if let Ok(me) = std::env::current_exe() {
        let p = me.with_file_name("marsd");
        if p.exists() {
            return p;
        }
    }
    "marsd".into()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: marsd syncs the log and writes everything back before it exits.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn run_shown(cmd: &mut Command) -> Result<String> {
    let quote = |s: &std::ffi::OsStr| {
        let s = s.to_string_lossy();
        if s.contains([' ', '?', '&']) {
            format!("'{s}'")
        } else {
            s.into_owned()
        }
    };
    let shown = std::iter::once(quote(cmd.get_program()))
        .chain(cmd.get_args().map(quote))
        .collect::<Vec<_>>()
        .join(" ");
    println!("$ {shown}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    print!("{text}");
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

pub fn run(cli: &Cli, args: &DemoArgs) -> Result<()> {
    let size = parse_size(&args.size).context("--size")?;
    let tmp;
    let dir: &Path = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d
        }
        None => {
            tmp = tempfile::Builder::new().prefix("mars-demo-").tempdir()?;
            tmp.path()
        }
    };
    let root = dir.join("root");
    let disk = dir.join("disk.img");
    step("starting marsd (host demo) with a file-backed disk");
    std::fs::File::create(&disk)?.set_len(size)?;
    let log = std::fs::File::create(dir.join("marsd.log"))?;
    // A free port, so that the demo runs beside a real marsd; below the ephemeral range, so no
    // outgoing connection takes it before marsd binds it.
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    let port = (start..32_000)
        .chain(20_000..start)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .context("no free port for the demo's peer listener")?;
    let peer_addr = format!("127.0.0.1:{port}");
    let child = Command::new(marsd_path())
        .arg("--root")
        .arg(&root)
        .args(["--host", "demo", "--listen", &peer_addr])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", marsd_path().display()))?;
    let _daemon = Daemon(child);
    let t = Duration::from_secs(cli.timeout);
    let deadline = Instant::now() + t;
    while client::call(&root, &Request::Ping, t).is_err() {
        if Instant::now() > deadline {
            bail!(
                "marsd did not come up; see {}",
                dir.join("marsd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("marsd runs with root {}", root.display());

    step("marsadm create-cluster; marsadm create-resource demo disk.img");
    for req in [
        Request::CreateCluster { ip: None },
        Request::CreateResource {
            res: "demo".parse()?,
            disk: disk.clone(),
            size: None,
        },
    ] {
        if let Reply::Done { message } = client::call(&root, &req, t)? {
            println!("{message}");
        }
    }
    let uri = format!(
        "nbd+unix:///demo?socket={}",
        root.join("nbd.sock").display()
    );

    step("writing through NBD and reading back");
    if have("qemu-io") {
        run_shown(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -z 4M 4M",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 0 4M",
            "-c",
            "read -P 0 4M 4M",
            &uri,
        ]))?;
        let out = run_shown(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 4M",
            &uri,
        ]))?;
        if out.contains("Pattern verification failed") {
            bail!("read back different data");
        }
    } else {
        println!("(qemu-io is not installed: apt-get install qemu-utils to see real I/O here)");
    }
    if have("nbdinfo") {
        run_shown(Command::new("nbdinfo").arg(&uri))?;
    }

    step("marsadm view demo");
    let Reply::View(v) = client::call(
        &root,
        &Request::View {
            res: None,
            window: None,
        },
        t,
    )?
    else {
        bail!("unexpected answer from marsd");
    };
    print!("{}", crate::view::cluster_text(&v, true));

    step("use it");
    let me = std::env::current_exe().map_or_else(|_| "marsadm".into(), |p| p.display().to_string());
    println!("  export MARS_ROOT={}", root.display());
    println!("  {me} view demo");
    println!("  {me} view-nbd-uri demo");
    println!("  qemu-img info '{uri}'");
    println!("  nbdcopy /some/file '{uri}'");
    println!("  {me} log-rotate demo");
    if args.exit {
        step("stopping marsd (the log is synced and written back first)");
        return Ok(());
    }
    println!(
        "\nmarsd keeps serving; press Ctrl-C to stop it and remove {}",
        dir.display()
    );
    wait_for_interrupt();
    step("stopping");
    Ok(())
}

fn wait_for_interrupt() {
    // Block SIGINT/SIGTERM and wait for one synchronously, so that cleanup (Drop) runs.
    // SAFETY: plain signal-mask manipulation on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}
