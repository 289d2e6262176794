//! What a box qube has besides its agent: a home directory, the in-qube
//! tools of `vm-tools/filecopy` wired to the box (the `qubes.Filecopy` and
//! `qubes.OpenInVM` services in its `/etc/qubes-rpc`, a
//! `qrexec-client-vm` that finds its agent), its own QubesDB (dom0's
//! `qubesdb-daemon <domid> <name>` with the keys qubesd writes for a
//! qube), and the box's confirmation program and policy for the
//! file-copy services.
//!
//! Every qube shares the host's filesystem, so "the qube's `~`" is
//! `<state>/home/<name>`: the services set `HOME` to it (the agent, running
//! as root, would give them `/root`), and [`command`] runs a program "in"
//! a qube: in its namespace, with that `HOME` as working directory, and
//! `QREXEC_CLIENT_VM`/`QFILE_AGENT`/`PATH` pointing at the box's tools.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netbox::{BoxConfig, ClientQube};

/// A qube's home directory (`~` for its services and [`command`]).
pub fn home(config: &BoxConfig, name: &str) -> PathBuf {
    config.state_dir.join("home").join(name)
}

/// A qube's own tool directory (its `qrexec-client-vm` wrapper).
pub fn vm_dir(config: &BoxConfig, name: &str) -> PathBuf {
    config.state_dir.join("vm").join(name)
}

/// The confirmation program the box's policy daemon runs for `ask`
/// rules: it answers what `<state>/ask-answer` holds (`allow:TARGET` or
/// `deny`), `deny` when there is no such file, and appends each question
/// to `<state>/ask.log`.
pub fn ask_program(config: &BoxConfig) -> PathBuf {
    config.state_dir.join("ask-program")
}

/// The file [`ask_program`] answers from.
pub fn ask_answer(config: &BoxConfig) -> PathBuf {
    config.state_dir.join("ask-answer")
}

/// Where [`ask_program`] logs the questions.
pub fn ask_log(config: &BoxConfig) -> PathBuf {
    config.state_dir.join("ask.log")
}

/// The command the box's `qubes.OpenInVM` handler opens files with in a
/// disposable (Qubes: the qube's default application): it appends a line
/// to the file, so the edit is visible to the sender.
pub const BOX_EDITOR_LINE: &str = "edited in the disposable";

/// Where the box's editor notes `QUBE TYPE FILE-NAME` for every file it
/// opens (`TYPE`: `/qubes-vm-type` from the qube's QubesDB).
pub fn open_log(config: &BoxConfig) -> PathBuf {
    config.state_dir.join("open-in-vm.log")
}

fn write_executable(path: &Path, text: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let temporary = path.with_extension("new");
    fs::write(&temporary, text)?;
    fs::set_permissions(&temporary, fs::Permissions::from_mode(0o755))?;
    fs::rename(&temporary, path)
}

/// Single-quotes `path` for `/bin/sh`.
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

/// Writes the ask program and the policy of the file-copy services
/// (before the `!compat-4.0` file): `qubes.Filecopy` allowed from client1
/// to client2, `ask` from client2 to client1 (default target client1),
/// `qubes.OpenInVM` from client1 to a disposable (`@dispvm`, i.e. of
/// client1's `default_dispvm`), both denied otherwise.
pub fn write_policy(config: &BoxConfig) -> io::Result<()> {
    write_executable(
        &ask_program(config),
        &format!(
            "#!/bin/sh\n# The box's answer to 'ask' rules: {answer}, else deny.\n\
             printf '%s\\n' \"$*\" >> {log}\n\
             if [ -f {answer} ]; then cat {answer}; else echo deny; fi\n",
            answer = sh_quote(&ask_answer(config)),
            log = sh_quote(&ask_log(config)),
        ),
    )?;
    fs::create_dir_all(config.policy_dir())?;
    fs::write(
        config.policy_dir().join("50-box-vm-tools.policy"),
        "# The box's file-copy and open-in-disposable policy.\n\
         qubes.Filecopy  *  client1  client2  allow\n\
         qubes.Filecopy  *  client2  client1  ask default_target=client1\n\
         qubes.Filecopy  *  @anyvm   @anyvm   deny\n\
         qubes.OpenInVM  *  client1  @dispvm  allow\n\
         qubes.OpenInVM  *  @anyvm   @anyvm   deny\n",
    )
}

/// Installs a qube's tools (called by `netbox::add_client` before its
/// agent starts): home, `qrexec-client-vm` wrapper, and the services
/// `qubes.Filecopy` (`qfile-unpacker` into `~/QubesIncoming/<source>/`)
/// and `qubes.OpenInVM` in `rpc`, its `/etc/qubes-rpc`.
pub fn install(config: &BoxConfig, client: &ClientQube, rpc: &Path) -> io::Result<()> {
    let home = home(config, &client.name);
    fs::create_dir_all(&home)?;
    let vm = vm_dir(config, &client.name);
    fs::create_dir_all(&vm)?;
    write_executable(
        &vm.join("qrexec-client-vm"),
        &format!(
            "#!/bin/sh\n# {name}'s qrexec-client-vm: ours, told where the box put its agent.\n\
             VCHAN_SOCKET_DIR={vchan} VCHAN_DOMAIN={domid} exec {client} --agent-socket={agent} \"$@\"\n",
            name = client.name,
            vchan = sh_quote(&config.vchan_dir()),
            domid = client.domid,
            client = sh_quote(&config.bin("qrexec-client-vm")),
            agent = sh_quote(&config.agent_socket(&client.name)),
        ),
    )?;
    // vm-tools/filecopy/qubes-rpc/qubes.Filecopy with the box's paths.
    write_executable(
        &rpc.join("qubes.Filecopy"),
        &format!(
            "#!/bin/sh\n# qubes.Filecopy in {name} (the box's paths)\n\
             HOME={home}; export HOME\n\
             case $1 in\n\
             \x20   '') exec {unpacker} ;;\n\
             \x20   allow-all-names) exec {unpacker} --allow-all-names ;;\n\
             \x20   *) printf 'Unexpected argument %s\\n' \"$1\" >&2; exit 1 ;;\n\
             esac\n",
            name = client.name,
            home = sh_quote(&home),
            unpacker = sh_quote(&config.bin("qfile-unpacker")),
        ),
    )?;
    // qubes.OpenInVM: vm-tools' `vm-file-editor` (the receiving side of
    // `qopen-in-vm`), opening the file with the box's editor in a private
    // directory under the qube's home.
    write_executable(
        &vm.join("box-editor"),
        &format!(
            "#!/bin/sh\n# The box's 'default application': edits the file it is given\n\
             # and notes which qube opened which file in {log}, with the\n\
             # qube's type from its QubesDB (through dom0's socket: the box\n\
             # runs no QubesDB daemon inside qubes).\n\
             type=$(QUBESDB_SOCKET_DIR={qubesdb} {read} -d '{name}' /qubes-vm-type) || type=no-qubesdb\n\
             printf '%s %s %s\\n' '{name}' \"$type\" \"${{1##*/}}\" >> {log}\n\
             printf '%s\\n' '{BOX_EDITOR_LINE}' >> \"$1\"\n",
            name = client.name,
            log = sh_quote(&open_log(config)),
            qubesdb = sh_quote(&config.qubesdb_dir()),
            read = sh_quote(&config.bin("qubesdb-read")),
        ),
    )?;
    write_executable(
        &rpc.join("qubes.OpenInVM"),
        &format!(
            "#!/bin/sh\n# qubes.OpenInVM in {name} (the box's paths and editor)\n\
             HOME={home}; TMPDIR={home}; PATH={vm}:$PATH\n\
             QUBES_OPEN_IN_VM_COMMAND=box-editor\n\
             export HOME TMPDIR PATH QUBES_OPEN_IN_VM_COMMAND\n\
             cd \"$HOME\" || exit 1\n\
             exec {handler} \"$@\"\n",
            name = client.name,
            home = sh_quote(&home),
            vm = sh_quote(&vm),
            handler = sh_quote(&config.bin("vm-file-editor")),
        ),
    )?;
    Ok(())
}

/// A command running `program` "in" qube `name` of a running box: in its
/// namespace, in its home, with its `qrexec-client-vm` and `qfile-agent`
/// (`QREXEC_CLIENT_VM`, `QFILE_AGENT`, `QOPEN_IN_VM`), its own
/// `qrexec-client-vm` wrapper then the box's binaries first in `PATH`, and
/// its vchan environment.
pub fn command(config: &BoxConfig, name: &str, domid: u16, program: &str) -> Command {
    let home = home(config, name);
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &config.netns(name)])
        .arg(program)
        .current_dir(&home)
        .env("HOME", &home)
        .env("VCHAN_SOCKET_DIR", config.vchan_dir())
        .env("VCHAN_DOMAIN", domid.to_string())
        .env(
            "QREXEC_CLIENT_VM",
            vm_dir(config, name).join("qrexec-client-vm"),
        )
        .env("QFILE_AGENT", config.bin("qfile-agent"))
        .env("QOPEN_IN_VM", config.bin("qopen-in-vm"))
        .env(
            "PATH",
            format!(
                "{}:{}:{}",
                vm_dir(config, name).display(),
                config.bin_dir.display(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
            ),
        );
    command
}

/// The keys qubesd writes into a qube's QubesDB that the box can fill:
/// its name and type, persistence (`none` for a disposable), its network
/// (behind the firewall) and DNS servers.
pub fn qubesdb_entries(config: &BoxConfig, client: &ClientQube) -> Vec<(String, String)> {
    let klass = crate::qubesd::Registry::new(config)
        .get(&client.name)
        .map_or_else(|| "AppVM".to_string(), |qube| qube.klass);
    let persistence = if klass == "DispVM" { "none" } else { "rw-only" };
    let dns = crate::netbox::DNS;
    [
        ("/name", client.name.clone()),
        ("/qubes-vm-type", klass),
        ("/qubes-vm-persistence", persistence.to_string()),
        ("/qubes-vm-updateable", "False".to_string()),
        ("/default-user", "root".to_string()),
        ("/qubes-ip", client.ip.to_string()),
        ("/qubes-netmask", "255.255.255.255".to_string()),
        ("/qubes-gateway", crate::netbox::FIREWALL_IP.to_string()),
        ("/qubes-primary-dns", dns[0].to_string()),
        ("/qubes-secondary-dns", dns[1].to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
