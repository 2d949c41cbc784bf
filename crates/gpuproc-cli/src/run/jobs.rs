//! The job list: parsing job files (one command per line, or TOML) and expanding command
//! templates with GNU parallel's placeholders. Pure: no processes, no files opened here.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// One job: a shell command and what it asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// 1-based sequence number (`{#}`, the job log's `Seq`).
    pub seq: usize,
    /// The command given to `sh -c`. May still hold `{%}`, filled in at launch.
    pub command: String,
    /// GPUs this job needs; `None`: the run's `--gpus-per-job`.
    pub gpus: Option<usize>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Retries for this job; `None`: the run's `--retries`.
    pub retries: Option<u32>,
    /// Seconds before the job is stopped; `None`: the run's `--timeout`.
    pub timeout: Option<f64>,
    /// Whether `{%}` in `command` is a placeholder for the slot number (templates only).
    pub slot_placeholder: bool,
}

impl Job {
    fn plain(seq: usize, command: String) -> Job {
        Job {
            seq,
            command,
            gpus: None,
            env: BTreeMap::new(),
            retries: None,
            timeout: None,
            slot_placeholder: false,
        }
    }

    /// The command to run in slot `slot` (1-based): `{%}` filled in for templates.
    pub fn command_for_slot(&self, slot: usize) -> String {
        if self.slot_placeholder {
            self.command.replace("{%}", &slot.to_string())
        } else {
            self.command.clone()
        }
    }
}

/// A job list that cannot be read; says where and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsError {
    /// The input's name (a path, `standard input`, `the command line`).
    pub source: String,
    /// 1-based line, where known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for JobsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}: line {line}: {}", self.source, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

impl std::error::Error for JobsError {}

/// The format of a job file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One shell command per line; blank lines and lines starting with `#` are skipped.
    Lines,
    /// `[[job]]` tables with `cmd` and optional `gpus`, `env`, `retries`, `timeout`.
    Toml,
}

/// Parses a job file's text.
///
/// # Errors
/// A [`JobsError`] naming `source` and the line: an unterminated quote in a command line,
/// a TOML syntax error, an unknown or mistyped field, a job without `cmd`.
pub fn parse(text: &str, format: Format, source: &str) -> Result<Vec<Job>, JobsError> {
    match format {
        Format::Lines => parse_lines(text, source),
        Format::Toml => parse_toml(text, source),
    }
}

fn parse_lines(text: &str, source: &str) -> Result<Vec<Job>, JobsError> {
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let command = line.trim();
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        if let Err(message) = check_quotes(command) {
            return Err(JobsError {
                source: source.to_owned(),
                line: Some(i + 1),
                message,
            });
        }
        jobs.push(Job::plain(jobs.len() + 1, command.to_owned()));
    }
    Ok(jobs)
}

/// Catches the commonest malformed line, an unbalanced quote, before `sh` sees it (where
/// it would fail only when that job's turn comes, with a less helpful message).
fn check_quotes(command: &str) -> Result<(), String> {
    let mut chars = command.chars();
    let mut open: Option<char> = None;
    while let Some(c) = chars.next() {
        match (open, c) {
            (None, '\\') | (Some('"'), '\\') => {
                chars.next();
            }
            (None, '\'' | '"') => open = Some(c),
            (Some(q), c) if q == c => open = None,
            _ => {}
        }
    }
    match open {
        None => Ok(()),
        Some('\'') => Err("unterminated single quote (').".to_owned()),
        Some(_) => Err("unterminated double quote (\").".to_owned()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    defaults: TomlDefaults,
    #[serde(default)]
    job: Vec<toml::Spanned<TomlJob>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlDefaults {
    gpus: Option<usize>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    retries: Option<u32>,
    timeout: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlJob {
    cmd: String,
    gpus: Option<usize>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    retries: Option<u32>,
    timeout: Option<f64>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn parse_toml(text: &str, source: &str) -> Result<Vec<Job>, JobsError> {
    let file: TomlFile = toml::from_str(text).map_err(|e| JobsError {
        source: source.to_owned(),
        line: e.span().map(|span| line_of(text, span.start)),
        message: e.message().trim_end().to_owned(),
    })?;
    let defaults = file.defaults;
    let mut jobs = Vec::with_capacity(file.job.len());
    for spanned in file.job {
        let line = line_of(text, spanned.span().start);
        let job = spanned.into_inner();
        let error = |message: &str| JobsError {
            source: source.to_owned(),
            line: Some(line),
            message: message.to_owned(),
        };
        if job.cmd.trim().is_empty() {
            return Err(error("`cmd` is empty; expected a shell command."));
        }
        if let Some(t) = job.timeout.or(defaults.timeout) {
            if !(t.is_finite() && t > 0.0) {
                return Err(error("`timeout` must be a positive number of seconds."));
            }
        }
        let mut env = defaults.env.clone();
        env.extend(job.env);
        jobs.push(Job {
            seq: jobs.len() + 1,
            command: job.cmd,
            gpus: job.gpus.or(defaults.gpus),
            env,
            retries: job.retries.or(defaults.retries),
            timeout: job.timeout.or(defaults.timeout),
            slot_placeholder: false,
        });
    }
    Ok(jobs)
}

/// Splits `TEMPLATE... ::: A... ::: B...` into the template words and the argument lists.
pub fn split_template(words: &[String]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut parts = words.split(|w| w == ":::");
    let template = parts.next().unwrap_or_default().to_vec();
    let lists = parts.map(<[String]>::to_vec).collect();
    (template, lists)
}

/// Every combination of one argument from each list, the last list varying fastest
/// (GNU parallel's order).
pub fn cartesian(lists: &[Vec<String>]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = vec![Vec::new()];
    for list in lists {
        rows = rows
            .iter()
            .flat_map(|row| {
                list.iter().map(move |arg| {
                    let mut next = row.clone();
                    next.push(arg.clone());
                    next
                })
            })
            .collect();
    }
    if lists.is_empty() {
        Vec::new()
    } else {
        rows
    }
}

/// Builds jobs from a template and argument rows.
///
/// Placeholders: `{}` all of the row's arguments, `{1}`, `{2}`, … one of them, `{#}` the
/// job's sequence number, `{%}` the slot number (filled in at launch). Arguments are
/// shell-quoted where needed. A template without `{}` or `{N}` gets the arguments appended.
///
/// # Errors
/// An empty template, or `{N}` beyond the number of argument lists.
pub fn expand(template: &[String], rows: &[Vec<String>]) -> Result<Vec<Job>, JobsError> {
    let error = |message: String| JobsError {
        source: "the command line".to_owned(),
        line: None,
        message,
    };
    if template.is_empty() {
        return Err(error("the command template is empty.".to_owned()));
    }
    let template = template.join(" ");
    let pieces = tokenize(&template);
    let takes_args = pieces
        .iter()
        .any(|p| matches!(p, Piece::All | Piece::Arg(_)));
    let width = rows.first().map_or(0, Vec::len);
    if let Some(n) = pieces.iter().find_map(|p| match p {
        Piece::Arg(n) if *n == 0 || *n > width => Some(*n),
        _ => None,
    }) {
        return Err(error(format!(
            "{{{n}}} in the template, but there {} {width} argument list{}; expected {{1}} to {{{width}}}.",
            if width == 1 { "is" } else { "are" },
            if width == 1 { "" } else { "s" },
        )));
    }
    let slot_placeholder = pieces.iter().any(|p| matches!(p, Piece::Slot));
    let mut jobs = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let seq = i + 1;
        let quoted: Vec<String> = row.iter().map(|a| shell_quote(a)).collect();
        let mut command = String::with_capacity(template.len() + 16);
        for piece in &pieces {
            match piece {
                Piece::Text(t) => command.push_str(t),
                Piece::All => command.push_str(&quoted.join(" ")),
                Piece::Arg(n) => command.push_str(&quoted[n - 1]),
                Piece::Seq => command.push_str(&seq.to_string()),
                Piece::Slot => command.push_str("{%}"),
            }
        }
        if !takes_args && !quoted.is_empty() {
            command.push(' ');
            command.push_str(&quoted.join(" "));
        }
        let mut job = Job::plain(seq, command);
        job.slot_placeholder = slot_placeholder;
        jobs.push(job);
    }
    Ok(jobs)
}

#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    All,
    Arg(usize),
    Seq,
    Slot,
}

fn tokenize(template: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        text.push_str(&rest[..start]);
        let after = &rest[start..];
        let close = after.find('}');
        let piece = close.and_then(|end| match &after[1..end] {
            "" => Some((Piece::All, end)),
            "#" => Some((Piece::Seq, end)),
            "%" => Some((Piece::Slot, end)),
            digits if digits.bytes().all(|b| b.is_ascii_digit()) && digits.len() < 6 => {
                Some((Piece::Arg(digits.parse().ok()?), end))
            }
            _ => None,
        });
        match piece {
            Some((piece, end)) => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(piece);
                rest = &after[end + 1..];
            }
            None => {
                text.push('{');
                rest = &after[1..];
            }
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    pieces
}

/// Quotes `arg` for `sh` unless it is made only of characters the shell leaves alone.
pub fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn commands(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.command.as_str()).collect()
    }

    #[test]
    fn lines_skip_blanks_and_comments() {
        let jobs = parse("echo a\n\n  # note\n  echo b  \n", Format::Lines, "f").unwrap();
        assert_eq!(commands(&jobs), ["echo a", "echo b"]);
        assert_eq!(jobs[1].seq, 2);
    }

    #[test]
    fn lines_with_unbalanced_quotes_name_the_line() {
        let err = parse("echo ok\necho 'it''s\n", Format::Lines, "jobs.txt").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err
            .to_string()
            .starts_with("jobs.txt: line 2: unterminated single quote"));
        let err = parse("echo \"a\\\"\n", Format::Lines, "j").unwrap_err();
        assert!(err.message.contains("double quote"), "{err}");
        assert!(parse("echo \"a\\\"b\" 'c\\' d\n", Format::Lines, "j").is_ok());
    }

    #[test]
    fn toml_jobs_with_defaults() {
        let text = r#"
[defaults]
retries = 2
env = { A = "1", B = "2" }

[[job]]
cmd = "python train.py"
gpus = 2
env = { B = "3" }

[[job]]
cmd = "echo hi"
retries = 0
timeout = 1.5
"#;
        let jobs = parse(text, Format::Toml, "j.toml").unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].gpus, Some(2));
        assert_eq!(jobs[0].retries, Some(2));
        assert_eq!(jobs[0].env["A"], "1");
        assert_eq!(jobs[0].env["B"], "3");
        assert_eq!(jobs[1].retries, Some(0));
        assert_eq!(jobs[1].timeout, Some(1.5));
        assert_eq!(jobs[1].seq, 2);
    }

    #[test]
    fn toml_errors_name_the_line() {
        let err = parse(
            "[[job]]\ncmd = \"a\"\n\n[[job]]\ncmd = \"b\"\ngpus = \"two\"\n",
            Format::Toml,
            "j.toml",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        let err = parse("[[job]]\ncmd = \"a\"\nnmae = 1\n", Format::Toml, "j.toml").unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("nmae"), "{err}");
        let err = parse("[[job]]\ngpus = 1\n", Format::Toml, "j.toml").unwrap_err();
        assert!(err.message.contains("cmd"), "{err}");
        assert_eq!(err.line, Some(1), "{err}");
        let err = parse(
            "[[job]]\ncmd = \"x\"\ntimeout = -1\n",
            Format::Toml,
            "j.toml",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(1), "{err}");
        let err = parse("[[job]\n", Format::Toml, "j.toml").unwrap_err();
        assert_eq!(err.line, Some(1), "{err}");
    }

    #[test]
    fn template_cartesian_product() {
        let (template, lists) = split_template(&words(
            "python train.py --lr {1} --seed {2} ::: 0.1 0.01 ::: 1 2 3",
        ));
        assert_eq!(template, words("python train.py --lr {1} --seed {2}"));
        let jobs = expand(&template, &cartesian(&lists)).unwrap();
        assert_eq!(jobs.len(), 6);
        assert_eq!(jobs[0].command, "python train.py --lr 0.1 --seed 1");
        assert_eq!(jobs[2].command, "python train.py --lr 0.1 --seed 3");
        assert_eq!(jobs[5].command, "python train.py --lr 0.01 --seed 3");
    }

    #[test]
    fn placeholders() {
        let rows = cartesian(&[words("a b"), words("x")]);
        let jobs = expand(&words("echo {} {#} {2} {%} {x} {"), &rows).unwrap();
        assert_eq!(jobs[1].command, "echo b x 2 x {%} {x} {");
        assert!(jobs[1].slot_placeholder);
        assert_eq!(jobs[1].command_for_slot(3), "echo b x 2 x 3 {x} {");
        let appended = expand(&words("echo"), &cartesian(&[words("a b")])).unwrap();
        assert_eq!(commands(&appended), ["echo a", "echo b"]);
        assert!(!appended[0].slot_placeholder);
    }

    #[test]
    fn template_errors() {
        let rows = cartesian(&[words("a")]);
        let err = expand(&words("echo {2}"), &rows).unwrap_err();
        assert!(err.to_string().contains("{2}"), "{err}");
        assert!(expand(&[], &rows).is_err());
    }

    #[test]
    fn arguments_are_quoted() {
        assert_eq!(shell_quote("a-b_c/1.0"), "a-b_c/1.0");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
