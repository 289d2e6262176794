//! Reading policy files from disk into an ordered list of rules.
//!
//! Follows Qubes' `AbstractFileSystemLoader` / `AbstractParser` /
//! `Compat40Loader` (`qrexec/policy/parser.py`, `parser_compat.py`):
//!
//! * the policy directories (default `/run/qubes/policy.d` then
//!   `/etc/qubes/policy.d`) are listed; only regular files named `*.policy`
//!   not starting with `.` count, and such a name with a character outside
//!   `[a-z0-9_.-]` makes the whole load fail (`invalid filename: PATH`); a
//!   basename seen in an earlier directory hides the later one; all files
//!   are then read in basename order — **first match wins** over that order;
//! * lines are stripped; empty lines and lines starting with `#` are
//!   skipped; `!include PATH`, `!include-dir PATH`,
//!   `!include-service SERVICE ARGUMENT PATH` and `!compat-4.0` are the
//!   directives; relative paths are resolved against the directory of the
//!   top-level file being read;
//! * `!include-service` files and the legacy directory of `!compat-4.0`
//!   (default `/etc/qubes-rpc/policy`) use the 4.0 format: `$include:` →
//!   `!include `, `$` → `@`, `,` → space, then `SOURCE TARGET ACTION …`;
//!   legacy files are walked sorted by service, then by argument with the
//!   argument-less `SERVICE` file last, and every `SERVICE+ARG` file is
//!   followed by the implicit `@anyvm @anyvm deny` and `@anyvm @adminvm
//!   deny` (line 0) so that its service's general file is only reached for
//!   other arguments — that is the fallback from `SERVICE+ARG` to `SERVICE`.
//!
//! Unlike Python, include nesting is bounded ([`MAX_INCLUDE_DEPTH`]) so an
//! include cycle is an error instead of a stack overflow. The loader never
//! evaluates anything and never returns a partial policy: any error fails the
//! whole load.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::rule::{Origin, PolicySyntaxError, Rule, is_rpcname_char, py_split, py_strip};

/// Deepest `!include` nesting accepted.
pub const MAX_INCLUDE_DEPTH: usize = 32;

/// Default runtime policy directory (read first).
pub const RUNTIME_POLICY_PATH: &str = "/run/qubes/policy.d";
/// Default policy directory.
pub const POLICY_PATH: &str = "/etc/qubes/policy.d";
/// Default legacy (Qubes 4.0) policy directory, read by `!compat-4.0`.
pub const LEGACY_POLICY_PATH: &str = "/etc/qubes-rpc/policy";

/// Where the policy lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPaths {
    /// Directories of `*.policy` files, earlier ones win on equal basenames.
    pub policy_dirs: Vec<PathBuf>,
    /// The legacy directory used by `!compat-4.0`.
    pub legacy_dir: PathBuf,
}

impl Default for PolicyPaths {
    fn default() -> Self {
        PolicyPaths {
            policy_dirs: vec![RUNTIME_POLICY_PATH.into(), POLICY_PATH.into()],
            legacy_dir: LEGACY_POLICY_PATH.into(),
        }
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A syntax error at `FILE:LINE`.
    #[error("{0}")]
    Syntax(#[from] PolicySyntaxError),
    /// A `*.policy` file name with forbidden characters.
    #[error("invalid filename: {0}")]
    InvalidFilename(String),
    /// A file or directory could not be read.
    #[error("failed to load {path} file: {reason}")]
    Io {
        /// The path.
        path: String,
        /// The OS error text.
        reason: String,
    },
}

/// The rules in evaluation order plus every path the load depended on (so a
/// watcher knows what to stat).
#[derive(Debug, Clone, Default)]
pub struct LoadedPolicy {
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
    /// Files and directories read.
    pub inputs: Vec<PathBuf>,
}

fn io_error(path: &Path, err: &std::io::Error) -> PolicyError {
    PolicyError::Io {
        path: path.display().to_string(),
        reason: err.to_string(),
    }
}

fn syntax(file: &Arc<str>, line: u32, message: impl Into<String>) -> PolicyError {
    PolicyError::Syntax(PolicySyntaxError {
        file: Arc::clone(file),
        line,
        message: message.into(),
    })
}

/// Split text into lines like Python's universal-newline reading.
fn py_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        if s.is_empty() {
            rest = None;
            return None;
        }
        match s.find(['\n', '\r']) {
            Some(i) => {
                let after = if s[i..].starts_with("\r\n") {
                    i + 2
                } else {
                    i + 1
                };
                rest = Some(&s[after..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

/// Make a path absolute and free of `..`/symlinks when it exists (Python's
/// `Path.resolve()`), keep it lexically otherwise.
fn resolve(base: &Path, included: &str) -> PathBuf {
    let joined = base.join(included);
    fs::canonicalize(&joined).unwrap_or(joined)
}

/// `filter_filepaths`: `*.policy` regular files not starting with `.`,
/// sorted; any other name character fails the whole directory. `dir` is
/// read on disk at `disk`; the paths returned are under `dir`.
fn list_policy_files(dir: &Path, disk: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let entries = fs::read_dir(disk).map_err(|e| io_error(dir, &e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, &e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".policy") || name == ".policy" {
            continue;
        }
        if !entry.path().is_file() {
            continue;
        }
        let path = dir.join(&*name);
        files.push((name.into_owned(), path));
    }
    for (name, path) in &files {
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
        {
            return Err(PolicyError::InvalidFilename(path.display().to_string()));
        }
    }
    let mut paths: Vec<PathBuf> = files.into_iter().map(|(_, p)| p).collect();
    paths.sort();
    Ok(paths)
}

/// Proposed changes for [`load_with_overrides`]: canonical file path →
/// new content, or `None` for a file about to be removed.
pub type Overrides = BTreeMap<PathBuf, Option<String>>;

struct Loader<'p> {
    paths: &'p PolicyPaths,
    /// `--root`: every path is a path on the real system, read under here.
    root: Option<&'p Path>,
    /// Files read from here instead of the disk (policy admin validation).
    overrides: Option<&'p Overrides>,
    out: LoadedPolicy,
    /// `Some` in lint mode: errors are collected and loading goes on.
    errors: Option<Vec<PolicyError>>,
}

/// Read `disk`, naming it `path` in errors.
fn read_text(path: &Path, disk: &Path) -> Result<String, PolicyError> {
    let bytes = fs::read(disk).map_err(|e| io_error(path, &e))?;
    String::from_utf8(bytes).map_err(|e| PolicyError::Io {
        path: path.display().to_string(),
        reason: format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
    })
}

/// `path` with `.` and `..` taken out lexically (never above `/`).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

impl Loader<'_> {
    fn file_label(path: &Path) -> Arc<str> {
        path.display().to_string().into()
    }

    /// Where a real-system path is read: itself, or under `--root`.
    fn disk(&self, path: &Path) -> PathBuf {
        match self.root {
            Some(root) => root.join(normalize(path).strip_prefix("/").unwrap_or(path)),
            None => path.to_owned(),
        }
    }

    /// Qubes' `(base / included).resolve()`; under `--root` lexically, on
    /// the real-system path (so an absolute include stays inside the root
    /// and messages name the path as it will be once installed).
    fn resolve(&self, base: &Path, included: &str) -> PathBuf {
        match self.root {
            Some(_) => normalize(&base.join(included)),
            None => resolve(base, included),
        }
    }

    fn read(&self, path: &Path) -> Result<String, PolicyError> {
        match self.overrides.and_then(|o| o.get(path)) {
            Some(Some(text)) => Ok(text.clone()),
            _ => read_text(path, &self.disk(path)),
        }
    }

    /// `list_policy_files` with the overrides applied as Qubes'
    /// `ValidateParser.load_policy_dir` does: overridden files are skipped,
    /// new contents for this directory come after the others.
    fn list_dir(&self, dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
        let mut files = list_policy_files(dir, &self.disk(dir))?;
        if let Some(overrides) = self.overrides {
            let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            files.retain(|p| !overrides.contains_key(&canon(p)));
            let dir = canon(dir);
            files.extend(
                overrides
                    .iter()
                    .filter(|(p, text)| p.parent() == Some(dir.as_path()) && text.is_some())
                    .map(|(p, _)| p.clone()),
            );
        }
        Ok(files)
    }

    fn include_file(
        &self,
        base: &Path,
        included: &str,
        file: &Arc<str>,
        line: u32,
    ) -> Result<PathBuf, PolicyError> {
        let path = self.resolve(base, included);
        match self.overrides.and_then(|o| o.get(&path)) {
            Some(Some(_)) => return Ok(path),
            Some(None) => {
                return Err(syntax(
                    file,
                    line,
                    format!("including a file that will be removed: {}", path.display()),
                ));
            }
            None => {}
        }
        if !self.disk(&path).is_file() {
            return Err(syntax(
                file,
                line,
                format!("not a file: {}", path.display()),
            ));
        }
        Ok(path)
    }

    fn check_depth(depth: usize, file: &Arc<str>, line: u32) -> Result<(), PolicyError> {
        if depth >= MAX_INCLUDE_DEPTH {
            return Err(syntax(
                file,
                line,
                format!("includes nested deeper than {MAX_INCLUDE_DEPTH} (include cycle?)"),
            ));
        }
        Ok(())
    }

    /// `load_policy_file`: a current-format file.
    fn load_file(&mut self, path: &Path, base: &Path, depth: usize) -> Result<(), PolicyError> {
        let text = self.read(path)?;
        self.out.inputs.push(self.disk(path));
        self.load_text(&text, Self::file_label(path), base, depth)
    }

    fn load_text(
        &mut self,
        text: &str,
        file: Arc<str>,
        base: &Path,
        depth: usize,
    ) -> Result<(), PolicyError> {
        for (index, raw) in py_lines(text).enumerate() {
            let line = u32::try_from(index + 1).unwrap_or(u32::MAX);
            if let Err(e) = self.text_line(raw, &file, line, base, depth) {
                self.fail(e)?;
            }
        }
        Ok(())
    }

    /// In lint mode, record the error and go on; otherwise stop.
    fn fail(&mut self, error: PolicyError) -> Result<(), PolicyError> {
        match &mut self.errors {
            Some(errors) => {
                errors.push(error);
                Ok(())
            }
            None => Err(error),
        }
    }

    fn text_line(
        &mut self,
        raw: &str,
        file: &Arc<str>,
        line: u32,
        base: &Path,
        depth: usize,
    ) -> Result<(), PolicyError> {
        let stripped = py_strip(raw);
        if stripped.is_empty() || stripped.starts_with('#') {
            return Ok(());
        }
        if stripped.starts_with('!') {
            let fields = py_split(stripped);
            let (directive, params) = fields.split_first().map_or(("", &[][..]), |(d, p)| (*d, p));
            match (directive, params) {
                ("!include", [included]) => {
                    Self::check_depth(depth, file, line)?;
                    let path = self.include_file(base, included, file, line)?;
                    self.load_file(&path, base, depth + 1)?;
                }
                ("!include-dir", [included]) => {
                    Self::check_depth(depth, file, line)?;
                    let dir = self.resolve(base, included);
                    if !self.disk(&dir).is_dir() {
                        return Err(syntax(
                            file,
                            line,
                            format!("not a directory: {}", dir.display()),
                        ));
                    }
                    self.out.inputs.push(self.disk(&dir));
                    for path in self.list_dir(&dir)? {
                        if let Err(e) = self.load_file(&path, base, depth + 1) {
                            self.fail(e)?;
                        }
                    }
                }
                ("!include-service", [service, argument, included]) => {
                    Self::check_depth(depth, file, line)?;
                    crate::rule::validate_service_and_argument(service, argument)
                        .map_err(|m| syntax(file, line, m))?;
                    let path = self.include_file(base, included, file, line)?;
                    self.load_service_file(service, argument, &path, base, depth + 1)?;
                }
                ("!compat-4.0", []) => {
                    log::warn!(
                        "warning: !compat-4.0 directive in file {file} line {line} is transitional and will be deprecated"
                    );
                    self.load_compat(file, line, depth)?;
                }
                ("!include" | "!include-dir" | "!include-service" | "!compat-4.0", _) => {
                    return Err(syntax(file, line, "invalid number of params"));
                }
                _ => return Err(syntax(file, line, "invalid directive")),
            }
            return Ok(());
        }
        let rule = Rule::from_line(
            stripped,
            Origin {
                file: Arc::clone(file),
                line,
            },
        )?;
        self.out.rules.push(rule);
        Ok(())
    }

    /// `load_policy_file_service`: a legacy-format file for one service.
    fn load_service_file(
        &mut self,
        service: &str,
        argument: &str,
        path: &Path,
        base: &Path,
        depth: usize,
    ) -> Result<(), PolicyError> {
        let text = self.read(path)?;
        self.out.inputs.push(self.disk(path));
        let file = Self::file_label(path);
        for (index, raw) in py_lines(&text).enumerate() {
            let line = u32::try_from(index + 1).unwrap_or(u32::MAX);
            if let Err(e) = self.service_line(service, argument, raw, &file, line, base, depth) {
                self.fail(e)?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // reason: mirrors Python's load_policy_file_service state
    fn service_line(
        &mut self,
        service: &str,
        argument: &str,
        raw: &str,
        file: &Arc<str>,
        line: u32,
        base: &Path,
        depth: usize,
    ) -> Result<(), PolicyError> {
        let stripped = py_strip(raw);
        if stripped.is_empty() || stripped.starts_with('#') {
            return Ok(());
        }
        let converted = stripped
            .replace("$include:", "!include ")
            .replace('$', "@")
            .replace(',', " ");
        if converted.starts_with('!') {
            let fields = py_split(&converted);
            match fields.as_slice() {
                ["!include", included] => {
                    Self::check_depth(depth, file, line)?;
                    crate::rule::validate_service_and_argument(service, argument)
                        .map_err(|m| syntax(file, line, m))?;
                    let path = self.include_file(base, included, file, line)?;
                    self.load_service_file(service, argument, &path, base, depth + 1)?;
                }
                ["!include", ..] => {
                    return Err(syntax(file, line, "invalid number of params"));
                }
                _ => return Err(syntax(file, line, "invalid directive")),
            }
            return Ok(());
        }
        let rule = Rule::from_line_service(
            service,
            argument,
            &converted,
            Origin {
                file: Arc::clone(file),
                line,
            },
        )?;
        self.out.rules.push(rule);
        Ok(())
    }

    /// `!compat-4.0`: the whole legacy directory, with the implicit denies.
    fn load_compat(&mut self, file: &Arc<str>, line: u32, depth: usize) -> Result<(), PolicyError> {
        let legacy = self.paths.legacy_dir.clone();
        let legacy_disk = self.disk(&legacy);
        let entries = fs::read_dir(&legacy_disk).map_err(|e| io_error(&legacy, &e))?;
        self.out.inputs.push(legacy_disk);
        // service -> argument ("*" for none) -> path
        let mut services: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&legacy, &e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = legacy.join(&name);
            if !entry.path().is_file()
                || [".rpmsave", ".rpmnew", ".swp"]
                    .iter()
                    .any(|s| name.ends_with(s))
                || name.starts_with('.')
                || !name.chars().all(is_rpcname_char)
            {
                log::info!("ignoring {} in legacy policy directory", path.display());
                continue;
            }
            let (service, argument) = match name.split_once('+') {
                Some((s, a)) => (s.to_owned(), format!("+{a}")),
                None => (name.clone(), "*".to_owned()),
            };
            services.entry(service).or_default().insert(argument, path);
        }
        for (service, mut arguments) in services {
            let general = arguments.remove("*");
            for (argument, path) in arguments {
                if let Err(e) = self.compat_file(&service, &argument, &path, file, line, depth) {
                    self.fail(e)?;
                }
                for implicit in ["@anyvm @anyvm deny", "@anyvm @adminvm deny"] {
                    let rule = Rule::from_line_service(
                        &service,
                        &argument,
                        implicit,
                        Origin {
                            file: Self::file_label(&path),
                            line: 0,
                        },
                    )?;
                    self.out.rules.push(rule);
                }
            }
            if let Some(path) = general
                && let Err(e) = self.compat_file(&service, "*", &path, file, line, depth)
            {
                self.fail(e)?;
            }
        }
        Ok(())
    }

    fn compat_file(
        &mut self,
        service: &str,
        argument: &str,
        path: &Path,
        file: &Arc<str>,
        line: u32,
        depth: usize,
    ) -> Result<(), PolicyError> {
        crate::rule::validate_service_and_argument(service, argument)
            .map_err(|m| syntax(file, line, m))?;
        let legacy = self.paths.legacy_dir.clone();
        self.load_service_file(service, argument, path, &legacy, depth + 1)
    }
}

fn run_loader(loader: &mut Loader<'_>) -> Result<(), PolicyError> {
    let paths = loader.paths;
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in &paths.policy_dirs {
        loader.out.inputs.push(loader.disk(dir));
        for path in loader.list_dir(dir)? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            seen.entry(name).or_insert(path);
        }
    }
    // As `ValidateParser`: proposed contents are read after the files on disk.
    let (proposed, on_disk): (Vec<PathBuf>, Vec<PathBuf>) = seen
        .into_values()
        .partition(|p| loader.overrides.is_some_and(|o| o.contains_key(p)));
    for path in on_disk.into_iter().chain(proposed) {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Err(e) = loader.load_file(&path, &base, 0) {
            loader.fail(e)?;
        }
    }
    Ok(())
}

/// Load the whole policy from `paths`; the first error fails the load.
pub fn load(paths: &PolicyPaths) -> Result<LoadedPolicy, PolicyError> {
    let mut loader = Loader {
        paths,
        root: None,
        overrides: None,
        out: LoadedPolicy::default(),
        errors: None,
    };
    run_loader(&mut loader)?;
    Ok(loader.out)
}

/// Load the policy as it would be after the changes in `overrides` (Qubes'
/// `ValidateParser`): an overridden file is read from there, a `None`
/// entry is a file about to be removed (including it is an error), and a new
/// `*.policy` file in a policy directory is loaded after that directory's
/// other files. Keys must be canonical paths.
pub fn load_with_overrides(
    paths: &PolicyPaths,
    overrides: &Overrides,
) -> Result<LoadedPolicy, PolicyError> {
    let mut loader = Loader {
        paths,
        root: None,
        overrides: Some(overrides),
        out: LoadedPolicy::default(),
        errors: None,
    };
    run_loader(&mut loader)?;
    Ok(loader.out)
}

/// [`load`] a policy tree that is not installed yet: every path (the policy
/// directories, the legacy directory, absolute `!include` and `$include:`
/// paths) is a path on the real system and is read under `root`, as if
/// `root` were `/`. Messages and rule origins name the real-system paths
/// (`/etc/qubes/policy.d/30-user.policy:3`), relative includes resolve
/// against the real-system directory, and `..` never leaves `root`. Paths
/// are resolved lexically: a symbolic link in the tree is followed by the
/// operating system when reading, so an absolute link points outside it.
pub fn load_under(paths: &PolicyPaths, root: &Path) -> Result<LoadedPolicy, PolicyError> {
    let mut loader = Loader {
        paths,
        root: Some(root),
        overrides: None,
        out: LoadedPolicy::default(),
        errors: None,
    };
    run_loader(&mut loader)?;
    Ok(loader.out)
}

/// [`lint`] under `root`, as [`load_under`] reads.
pub fn lint_under(paths: &PolicyPaths, root: &Path) -> Vec<PolicyError> {
    let mut loader = Loader {
        paths,
        root: Some(root),
        overrides: None,
        out: LoadedPolicy::default(),
        errors: Some(Vec::new()),
    };
    let fatal = run_loader(&mut loader).err();
    let mut errors = loader.errors.unwrap_or_default();
    errors.extend(fatal);
    errors
}

/// Check the whole policy and return every error found (empty = valid).
/// Parsing goes on after an error in a line, a file or an include.
pub fn lint(paths: &PolicyPaths) -> Vec<PolicyError> {
    let mut loader = Loader {
        paths,
        root: None,
        overrides: None,
        out: LoadedPolicy::default(),
        errors: Some(Vec::new()),
    };
    let fatal = run_loader(&mut loader).err();
    let mut errors = loader.errors.unwrap_or_default();
    errors.extend(fatal);
    errors
}

/// Load one current-format text as if it were the file `label` in `base`
/// (includes resolve against `base`). Used by tests and by the linter.
pub fn load_text(
    text: &str,
    label: &str,
    base: &Path,
    legacy_dir: &Path,
) -> Result<LoadedPolicy, PolicyError> {
    let paths = PolicyPaths {
        policy_dirs: Vec::new(),
        legacy_dir: legacy_dir.to_owned(),
    };
    let mut loader = Loader {
        paths: &paths,
        root: None,
        overrides: None,
        out: LoadedPolicy::default(),
        errors: None,
    };
    loader.load_text(text, label.into(), base, 0)?;
    Ok(loader.out)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;
    use crate::rule::Action;
    use crate::token::Token;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&p, text).unwrap();
        p
    }

    fn paths(dirs: &[&Path], legacy: &Path) -> PolicyPaths {
        PolicyPaths {
            policy_dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
            legacy_dir: legacy.to_owned(),
        }
    }

    #[test]
    fn files_sorted_first_dir_wins_bad_names_fail() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("run");
        let etc = t.path().join("etc");
        fs::create_dir_all(&run).unwrap();
        fs::create_dir_all(&etc).unwrap();
        write(&etc, "50-b.policy", "s * b @anyvm deny\n");
        write(&etc, "30-a.policy", "s * a @anyvm deny\n");
        write(&etc, "40-x.policy", "s * etc-x @anyvm deny\n");
        write(&run, "40-x.policy", "s * run-x @anyvm deny\n");
        write(&etc, ".hidden.policy", "garbage\n");
        write(&etc, "README", "garbage\n");
        write(&etc, "x.policy.rpmnew", "garbage\n");
        let loaded = load(&paths(&[&run, &etc], t.path())).unwrap();
        let sources: Vec<String> = loaded.rules.iter().map(|r| r.source.text()).collect();
        assert_eq!(sources, ["a", "run-x", "b"]);
        write(&etc, "Bad.policy", "");
        let err = load(&paths(&[&run, &etc], t.path())).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("invalid filename: {}", etc.join("Bad.policy").display())
        );
    }

    #[test]
    fn missing_directory_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let err = load(&paths(&[&t.path().join("nope")], t.path())).unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }), "{err}");
        assert!(err.to_string().starts_with("failed to load "));
    }

    #[test]
    fn directives() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("policy.d");
        write(&d, "include/inc", "s * inc @anyvm allow\n");
        write(
            &d,
            "include/svc",
            "$anyvm $dispvm:dvm allow,target=$dispvm:dvm\n",
        );
        write(&d, "sub/10-x.policy", "s * dir @anyvm deny\n");
        write(
            &d,
            "10-main.policy",
            "# comment\n\n  !include include/inc\n!include-dir sub\n!include-service qubes.Gpg * include/svc\ns * last @anyvm deny\n",
        );
        let loaded = load(&paths(&[&d], t.path())).unwrap();
        let got: Vec<(Option<&str>, String)> = loaded
            .rules
            .iter()
            .map(|r| (r.service.as_deref(), r.source.text()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("s"), "inc".to_owned()),
                (Some("s"), "dir".to_owned()),
                (Some("qubes.Gpg"), "@anyvm".to_owned()),
                (Some("s"), "last".to_owned()),
            ]
        );
        assert_eq!(
            loaded.rules[2].action,
            Action::Allow {
                target: Some(Token::DispVmTemplate("dvm".into())),
                user: None,
                notify: false,
                autostart: true
            }
        );
        assert!(loaded.inputs.iter().any(|p| p.ends_with("include/inc")));
    }

    fn text_err(text: &str) -> String {
        let t = tempfile::tempdir().unwrap();
        load_text(text, "/x.policy", t.path(), t.path())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn directive_errors() {
        assert_eq!(
            text_err("!include"),
            "/x.policy:1: invalid number of params"
        );
        assert_eq!(
            text_err("!include a b"),
            "/x.policy:1: invalid number of params"
        );
        assert_eq!(
            text_err("!include-dir"),
            "/x.policy:1: invalid number of params"
        );
        assert_eq!(
            text_err("!include-service a b"),
            "/x.policy:1: invalid number of params"
        );
        assert_eq!(
            text_err("!compat-4.0 x"),
            "/x.policy:1: invalid number of params"
        );
        assert_eq!(text_err("\n!bogus"), "/x.policy:2: invalid directive");
        assert!(text_err("!include nope").starts_with("/x.policy:1: not a file: "));
        assert!(text_err("!include-dir nope").starts_with("/x.policy:1: not a directory: "));
        assert_eq!(
            text_err("!include-service a$ * f"),
            "/x.policy:1: service 'a$' contains invalid characters: ('$',)"
        );
    }

    #[test]
    fn include_cycle_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "a", "!include b\n");
        write(t.path(), "b", "!include a\n");
        let err = load_text("!include a", "/x.policy", t.path(), t.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested deeper than 32"), "{err}");
    }

    #[test]
    fn universal_newlines_and_utf8() {
        let t = tempfile::tempdir().unwrap();
        let loaded = load_text(
            "s * a @anyvm deny\r\ns * b @anyvm deny\rs * c @anyvm deny",
            "/x.policy",
            t.path(),
            t.path(),
        )
        .unwrap();
        assert_eq!(loaded.rules.len(), 3);
        assert_eq!(loaded.rules[2].origin.line, 3);
        write(t.path(), "bad", "");
        fs::write(t.path().join("bad"), b"\xff\xfe").unwrap();
        let err = load_text("!include bad", "/x.policy", t.path(), t.path()).unwrap_err();
        assert!(err.to_string().contains("invalid UTF-8"), "{err}");
    }

    #[test]
    fn compat_order_and_implicit_denies() {
        let t = tempfile::tempdir().unwrap();
        let legacy = t.path().join("legacy");
        write(&legacy, "test.File", "$anyvm $anyvm deny\n");
        write(
            &legacy,
            "test.File+testfile1",
            "source_vm1 target_vm allow\n",
        );
        write(
            &legacy,
            "test.File+testfile2",
            "source_vm2 target_vm allow\n",
        );
        write(&legacy, "a.Svc", "$anyvm $anyvm ask\n");
        write(&legacy, "bad name", "garbage\n");
        write(&legacy, "x.rpmsave", "garbage\n");
        let loaded = load_text("!compat-4.0", "/x.policy", t.path(), &legacy).unwrap();
        let got: Vec<String> = loaded
            .rules
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {} {:?} {}",
                    r.service.as_deref().unwrap_or("*"),
                    r.argument.as_deref().unwrap_or("*"),
                    r.source.text(),
                    r.target.text(),
                    r.action.is_deny(),
                    r.origin.line
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                "a.Svc * @anyvm @anyvm false 1",
                "test.File +testfile1 source_vm1 target_vm false 1",
                "test.File +testfile1 @anyvm @anyvm true 0",
                "test.File +testfile1 @anyvm @adminvm true 0",
                "test.File +testfile2 source_vm2 target_vm false 1",
                "test.File +testfile2 @anyvm @anyvm true 0",
                "test.File +testfile2 @anyvm @adminvm true 0",
                "test.File * @anyvm @anyvm true 1",
            ]
        );
        assert!(loaded.rules[2].origin.file.ends_with("test.File+testfile1"));
    }

    #[test]
    fn legacy_include_and_errors() {
        let t = tempfile::tempdir().unwrap();
        let legacy = t.path().join("legacy");
        write(&legacy, "include/common", "$anyvm $anyvm deny\n");
        write(
            &legacy,
            "qubes.Foo",
            "work vault allow\n$include:include/common\n",
        );
        let loaded = load_text("!compat-4.0", "/x.policy", t.path(), &legacy).unwrap();
        assert_eq!(loaded.rules.len(), 2);
        write(&legacy, "qubes.Foo", "work vault allow\n$include:a b\n");
        let err = load_text("!compat-4.0", "/x.policy", t.path(), &legacy).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:2: invalid number of params",
                legacy.join("qubes.Foo").display()
            )
        );
        write(&legacy, "qubes.Foo", "!other\n");
        let err = load_text("!compat-4.0", "/x.policy", t.path(), &legacy).unwrap_err();
        assert!(err.to_string().ends_with(":1: invalid directive"), "{err}");
        write(&legacy, "qubes.Foo", "work vault permit\n");
        let err = load_text("!compat-4.0", "/x.policy", t.path(), &legacy).unwrap_err();
        assert!(
            err.to_string().ends_with(":1: invalid action: permit"),
            "{err}"
        );
    }
}
