//! A Dockerfile subset parsed into a build: the base image reference and the
//! [`BuildStep`](super::images::BuildStep)s after `FROM`, as `POST /v1/images/build` takes them.
//! Shared by the client library and the CLI; depends on std and serde only.
//!
//! Supported: `FROM` (one stage; `AS name` allowed), `RUN`, `CMD`, `ENTRYPOINT` (shell form →
//! `["/bin/sh", "-c", TEXT]`, or the JSON exec form), `ENV` (`K=V K2="v 2"` and `K rest of
//! line`), `WORKDIR`, `COPY` (`SRC… DEST` or the JSON form), `USER`, `ARG NAME[=default]` (also
//! before `FROM`, where it only serves the base reference, as in Docker), `#` comments and `\`
//! line continuations.
//!
//! `$VAR` / `${VAR}` in instructions after `FROM` are kept as written: sbxd substitutes ARG
//! and ENV values when it runs the build. In `FROM`, `$NAME` is replaced here by the build
//! argument given from outside or the default of an `ARG` before `FROM`.
//!
//! Refused with an error naming the line: `FROM scratch` (there is no empty base to run in), a
//! second `FROM` (multi-stage builds), `COPY --from`/`--chown`/`--chmod`/`--link`, flags on
//! `RUN`, here-documents, and every other instruction (`ADD`, `LABEL`, `HEALTHCHECK`, `SHELL`,
//! `VOLUME`, `ONBUILD`, `STOPSIGNAL`, `MAINTAINER`). `EXPOSE` is accepted and ignored: a sandbox
//! has its own network namespace and ports need no declaring; the parse returns a warning for
//! each one (the CLI prints them) so the drop is never silent.

use super::images::BuildStep;
use std::collections::BTreeMap;

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The `FROM` reference, `$ARG`s substituted.
    pub base: String,
    pub steps: Vec<BuildStep>,
    /// Instructions accepted but without effect (`line 4: EXPOSE 8000 ignored: …`).
    pub warnings: Vec<String>,
}

/// Steps parsed from Dockerfile lines without `FROM` (`Image::dockerfile_commands`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steps {
    pub steps: Vec<BuildStep>,
    pub warnings: Vec<String>,
}

/// Why a Dockerfile was refused: the line (1-based; the first line of a continued
/// instruction), the instruction as written, and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {reason}: {text}")]
pub struct DockerfileError {
    pub line: usize,
    pub text: String,
    pub reason: String,
}

/// One logical instruction: continuation lines joined.
struct Instruction {
    line: usize,
    /// The whole instruction as written (continuations joined), for messages.
    text: String,
    /// Upper-cased keyword.
    keyword: String,
    /// Everything after the keyword, trimmed.
    args: String,
}

impl Instruction {
    fn err(&self, reason: impl Into<String>) -> DockerfileError {
        DockerfileError {
            line: self.line,
            text: self.text.clone(),
            reason: reason.into(),
        }
    }
}

/// Parses a whole Dockerfile. `build_args` are the `--build-arg` values (they win over `ARG`
/// defaults in `FROM`).
pub fn parse(
    text: &str,
    build_args: &BTreeMap<String, String>,
) -> Result<Dockerfile, DockerfileError> {
    let instructions = split(text)?;
    let mut pre_from: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut base: Option<String> = None;
    let mut steps = Vec::new();
    let mut warnings = Vec::new();
    for ins in &instructions {
        if base.is_none() {
            match ins.keyword.as_str() {
                "ARG" => {
                    let (name, default) = parse_arg(ins)?;
                    pre_from.insert(name, default);
                    continue;
                }
                "FROM" => {
                    base = Some(parse_from(ins, &pre_from, build_args)?);
                    continue;
                }
                _ => {
                    return Err(ins.err(format!(
                        "{} before FROM: a Dockerfile starts with FROM (only ARG may come first)",
                        ins.keyword
                    )))
                }
            }
        }
        if ins.keyword == "FROM" {
            return Err(ins.err(
                "a second FROM: multi-stage builds are not supported (build one stage per Dockerfile)",
            ));
        }
        if ins.keyword == "ARG" {
            // As in Docker: `ARG NAME` after FROM takes the default of an ARG before FROM.
            let (name, default) = parse_arg(ins)?;
            let default = default.or_else(|| pre_from.get(&name).cloned().flatten());
            steps.push(BuildStep::Arg { name, default });
            continue;
        }
        if let Some(step) = parse_step(ins, &mut warnings)? {
            steps.push(step);
        }
    }
    let Some(base) = base else {
        return Err(DockerfileError {
            line: instructions.last().map_or(1, |i| i.line),
            text: String::new(),
            reason: "no FROM instruction".into(),
        });
    };
    Ok(Dockerfile {
        base,
        steps,
        warnings,
    })
}

/// Parses Dockerfile instructions that come after `FROM` (no `FROM` allowed).
pub fn parse_steps(text: &str) -> Result<Steps, DockerfileError> {
    let mut steps = Vec::new();
    let mut warnings = Vec::new();
    for ins in &split(text)? {
        match ins.keyword.as_str() {
            "FROM" => return Err(ins.err(
                "FROM is not allowed here: these commands extend an image that already has a base",
            )),
            "ARG" => {
                let (name, default) = parse_arg(ins)?;
                steps.push(BuildStep::Arg { name, default });
            }
            _ => {
                if let Some(step) = parse_step(ins, &mut warnings)? {
                    steps.push(step);
                }
            }
        }
    }
    Ok(Steps { steps, warnings })
}

/// Joins continuation lines and drops comments and blank lines.
fn split(text: &str) -> Result<Vec<Instruction>, DockerfileError> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        // Comment lines are removed, also in the middle of a continued instruction (Docker).
        if trimmed.starts_with('#') {
            continue;
        }
        if trimmed.is_empty() {
            // Docker allows (and warns about) blank lines inside a continuation.
            continue;
        }
        let (body, continues) = match raw.trim_end().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (raw.trim_end(), false),
        };
        // As Docker: the backslash and newline go, the next line's indentation too, and
        // nothing is inserted (`a \` + `  b` is `a b`; `a\` + `b` is `ab`).
        let (start, mut acc) = cur.take().unwrap_or((n, String::new()));
        acc.push_str(body.trim_start());
        if continues {
            cur = Some((start, acc));
        } else {
            out.push(instruction(start, acc.trim_end().to_string()));
        }
    }
    if let Some((start, acc)) = cur {
        // A final `\` with nothing after it: the instruction ends there.
        out.push(instruction(start, acc.trim_end().to_string()));
    }
    Ok(out)
}

fn instruction(line: usize, text: String) -> Instruction {
    let (keyword, args) = match text.find(char::is_whitespace) {
        Some(i) => (&text[..i], text[i..].trim()),
        None => (text.as_str(), ""),
    };
    Instruction {
        line,
        keyword: keyword.to_ascii_uppercase(),
        args: args.to_string(),
        text,
    }
}

fn parse_from(
    ins: &Instruction,
    pre_from: &BTreeMap<String, Option<String>>,
    build_args: &BTreeMap<String, String>,
) -> Result<String, DockerfileError> {
    let words: Vec<&str> = ins.args.split_whitespace().collect();
    if let Some(flag) = words.iter().find(|w| w.starts_with("--")) {
        return Err(ins.err(format!("FROM flag {flag} is not supported")));
    }
    let reference = match words.as_slice() {
        [r] => *r,
        [r, as_, _name] if as_.eq_ignore_ascii_case("as") => *r,
        [] => return Err(ins.err("FROM needs an image reference")),
        _ => return Err(ins.err("expected FROM IMAGE [AS NAME]")),
    };
    let reference = substitute(reference, |name| {
        build_args
            .get(name)
            .cloned()
            .or_else(|| pre_from.get(name).cloned().flatten())
    })
    .map_err(|e| ins.err(e))?;
    if reference.is_empty() {
        return Err(ins.err("FROM names an empty image reference (an ARG without a value?)"));
    }
    if reference == "scratch" {
        return Err(ins.err(
            "FROM scratch is not supported: a build runs its steps in the base, and scratch has \
             nothing to run; start from `host` or an image",
        ));
    }
    Ok(reference)
}

/// `$NAME` and `${NAME}` replaced by `lookup` (empty when it has no value); `\$` is a literal `$`.
fn substitute(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' => {
                let name: String = if chars.peek() == Some(&'{') {
                    chars.next();
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("unterminated ${{ in {s:?}")),
                        }
                    }
                    if name.contains(':') {
                        return Err(format!(
                            "${{{name}}}: modifiers (:-, :+) are not supported in FROM"
                        ));
                    }
                    name
                } else {
                    let mut name = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_ascii_alphanumeric() || c == '_' {
                            name.push(c);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    name
                };
                if name.is_empty() {
                    out.push('$');
                } else {
                    out.push_str(&lookup(&name).unwrap_or_default());
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    let mut b = name.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn parse_arg(ins: &Instruction) -> Result<(String, Option<String>), DockerfileError> {
    let words = shell_words(&ins.args).map_err(|e| ins.err(e))?;
    let [word] = words.as_slice() else {
        return Err(ins.err("expected ARG NAME[=DEFAULT] (one per ARG)"));
    };
    let (name, default) = match word.split_once('=') {
        Some((n, d)) => (n, Some(d.to_string())),
        None => (word.as_str(), None),
    };
    if !valid_name(name) {
        return Err(ins.err(format!(
            "invalid ARG name {name:?}: must match [A-Za-z_][A-Za-z0-9_]*"
        )));
    }
    Ok((name.to_string(), default))
}

/// One instruction after FROM (not ARG) → a step, `None` for EXPOSE.
fn parse_step(
    ins: &Instruction,
    warnings: &mut Vec<String>,
) -> Result<Option<BuildStep>, DockerfileError> {
    let step = match ins.keyword.as_str() {
        "RUN" => {
            if ins.args.starts_with("--") {
                let flag = ins.args.split_whitespace().next().unwrap_or_default();
                return Err(ins.err(format!("RUN flag {flag} is not supported")));
            }
            BuildStep::Run {
                argv: command(ins)?,
            }
        }
        "CMD" => BuildStep::Cmd {
            argv: command(ins)?,
        },
        "ENTRYPOINT" => BuildStep::Entrypoint {
            argv: command(ins)?,
        },
        "ENV" => BuildStep::Env {
            vars: parse_env(ins)?,
        },
        "WORKDIR" => {
            if ins.args.is_empty() {
                return Err(ins.err("WORKDIR needs a path"));
            }
            let words = shell_words(&ins.args).map_err(|e| ins.err(e))?;
            let [path] = words.as_slice() else {
                return Err(ins.err("WORKDIR takes one path (quote a path with spaces)"));
            };
            BuildStep::Workdir { path: path.clone() }
        }
        "USER" => {
            let words = shell_words(&ins.args).map_err(|e| ins.err(e))?;
            let [user] = words.as_slice() else {
                return Err(ins.err("expected USER NAME|UID[:GID]"));
            };
            BuildStep::User { user: user.clone() }
        }
        "COPY" => parse_copy(ins)?,
        "EXPOSE" => {
            warnings.push(format!(
                "line {}: {} ignored: sandboxes have their own network namespace and need no \
                 declared ports",
                ins.line, ins.text
            ));
            return Ok(None);
        }
        "ADD" => return Err(ins.err(
            "ADD is not supported (it fetches URLs and unpacks archives); use COPY for local files",
        )),
        "LABEL" | "HEALTHCHECK" | "SHELL" | "VOLUME" | "ONBUILD" | "STOPSIGNAL" | "MAINTAINER" => {
            return Err(ins.err(format!("{} is not supported", ins.keyword)))
        }
        other => return Err(ins.err(format!("unknown instruction {other}"))),
    };
    Ok(Some(step))
}

/// RUN/CMD/ENTRYPOINT arguments: the JSON exec form, else the shell form.
fn command(ins: &Instruction) -> Result<Vec<String>, DockerfileError> {
    if ins.args.is_empty() {
        return Err(ins.err(format!("{} needs a command", ins.keyword)));
    }
    if ins.args.starts_with("<<") {
        return Err(ins.err("here-documents (<<EOF) are not supported"));
    }
    if let Some(argv) = json_form(&ins.args) {
        if argv.is_empty() && ins.keyword == "RUN" {
            return Err(ins.err("RUN [] runs nothing"));
        }
        return Ok(argv);
    }
    Ok(vec!["/bin/sh".into(), "-c".into(), ins.args.clone()])
}

/// `["a", "b"]`: a JSON array of strings; anything else (as Docker) is the shell form.
fn json_form(args: &str) -> Option<Vec<String>> {
    if !args.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(args).ok()
}

fn parse_copy(ins: &Instruction) -> Result<BuildStep, DockerfileError> {
    if let Some(flagged) = ins.args.strip_prefix("--") {
        let end = flagged.find(char::is_whitespace).unwrap_or(flagged.len());
        let flag = &flagged[..end];
        let name = flag.split('=').next().unwrap_or(flag);
        let why = match name {
            "from" => {
                "copying from another stage or image is not supported (single-stage builds only)"
            }
            "chown" => "files are copied owned by root (0:0); add `RUN chown …` after the COPY",
            "chmod" => {
                "modes are copied as they are in the context; add `RUN chmod …` after the COPY"
            }
            _ => "not supported",
        };
        return Err(ins.err(format!("COPY --{name}: {why}")));
    }
    let rest = ins.args.trim();
    let words = match json_form(rest) {
        Some(w) => w,
        None => shell_words(rest).map_err(|e| ins.err(e))?,
    };
    let Some((dest, sources)) = words.split_last() else {
        return Err(ins.err("expected COPY SRC... DEST"));
    };
    if sources.is_empty() {
        return Err(ins.err("COPY needs at least one source and a destination"));
    }
    for s in sources {
        if s.starts_with('/') || s.split('/').any(|c| c == "..") {
            return Err(ins.err(format!(
                "COPY source {s:?} must be relative to the build context, without `..`"
            )));
        }
    }
    Ok(BuildStep::Copy {
        sources: sources.to_vec(),
        dest: dest.clone(),
    })
}

/// `ENV K=V K2="v 2"` or the old form `ENV K the rest of the line`.
fn parse_env(ins: &Instruction) -> Result<BTreeMap<String, String>, DockerfileError> {
    let args = ins.args.as_str();
    if args.is_empty() {
        return Err(ins.err("ENV needs NAME=VALUE"));
    }
    let first_end = args.find(char::is_whitespace).unwrap_or(args.len());
    let mut vars = BTreeMap::new();
    if !args[..first_end].contains('=') {
        // `ENV NAME value with spaces`.
        let name = &args[..first_end];
        if !valid_name(name) {
            return Err(ins.err(format!(
                "invalid ENV name {name:?}: must match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        let value = args[first_end..].trim();
        if value.is_empty() {
            return Err(ins.err(format!("ENV {name} needs a value (ENV {name}=VALUE)")));
        }
        let words = shell_words(value).map_err(|e| ins.err(e))?;
        vars.insert(name.to_string(), words.join(" "));
        return Ok(vars);
    }
    for word in shell_words(args).map_err(|e| ins.err(e))? {
        let Some((name, value)) = word.split_once('=') else {
            return Err(ins.err(format!(
                "{word:?} is not NAME=VALUE (mixing `ENV K V` and `ENV K=V` forms?)"
            )));
        };
        if !valid_name(name) {
            return Err(ins.err(format!(
                "invalid ENV name {name:?}: must match [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        vars.insert(name.to_string(), value.to_string());
    }
    Ok(vars)
}

/// Words split as Docker splits ENV/ARG/COPY/WORKDIR arguments: whitespace separates; `'…'`
/// literal; `"…"` with `\"` and `\\` escapes; a backslash outside quotes escapes the next
/// character. `$` is kept as written (sbxd substitutes).
fn shell_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(format!("unterminated ' in {s:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => cur.push(c),
                            // `\$` stays escaped so sbxd's substitution keeps it literal.
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(format!("unterminated \" in {s:?}")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(format!("unterminated \" in {s:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('$') => cur.push_str("\\$"),
                    Some(c) => cur.push(c),
                    None => cur.push('\\'),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_args() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn sh(cmd: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), cmd.into()]
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_typical_dockerfile() {
        let text = r#"
# syntax comment
FROM host
ENV A=1 B="two words" C='single $x'
ENV PATHLIKE /opt/bin:/usr/bin
WORKDIR /app
COPY main.py lib/ /app/
COPY ["with space.txt", "/app/dest file"]
RUN apt-get update && \
    # a comment inside a continuation
    echo done
RUN ["echo", "exec", "form"]
USER 1000:1000
EXPOSE 8000/tcp
ENTRYPOINT ["python3"]
CMD main.py --port 8000
"#;
        let d = parse(text, &no_args()).unwrap();
        assert_eq!(d.base, "host");
        assert_eq!(
            d.steps,
            vec![
                BuildStep::Env {
                    vars: vars(&[("A", "1"), ("B", "two words"), ("C", "single $x")])
                },
                BuildStep::Env {
                    vars: vars(&[("PATHLIKE", "/opt/bin:/usr/bin")])
                },
                BuildStep::Workdir {
                    path: "/app".into()
                },
                BuildStep::Copy {
                    sources: vec!["main.py".into(), "lib/".into()],
                    dest: "/app/".into()
                },
                BuildStep::Copy {
                    sources: vec!["with space.txt".into()],
                    dest: "/app/dest file".into()
                },
                BuildStep::Run {
                    argv: sh("apt-get update && echo done")
                },
                BuildStep::Run {
                    argv: vec!["echo".into(), "exec".into(), "form".into()]
                },
                BuildStep::User {
                    user: "1000:1000".into()
                },
                BuildStep::Entrypoint {
                    argv: vec!["python3".into()]
                },
                BuildStep::Cmd {
                    argv: sh("main.py --port 8000")
                },
            ]
        );
        assert_eq!(d.warnings.len(), 1);
        assert!(
            d.warnings[0].starts_with("line 14: EXPOSE 8000/tcp ignored"),
            "{:?}",
            d.warnings
        );
    }

    #[test]
    fn keywords_are_case_insensitive_and_bad_json_is_the_shell_form() {
        let d = parse("from host\nrun [not json\ncmd [\"a\", 1]", &no_args()).unwrap();
        assert_eq!(
            d.steps,
            vec![
                BuildStep::Run {
                    argv: sh("[not json")
                },
                BuildStep::Cmd {
                    argv: sh("[\"a\", 1]")
                },
            ]
        );
    }

    #[test]
    fn args_before_from_serve_the_base() {
        let text = "ARG REG=127.0.0.1:5000\nARG TAG\nFROM ${REG}/test/busybox:$TAG AS app\nARG TAG\nARG REG\nARG OTHER=x\n";
        let mut given = no_args();
        given.insert("TAG".into(), "1".into());
        let d = parse(text, &given).unwrap();
        assert_eq!(d.base, "127.0.0.1:5000/test/busybox:1");
        assert_eq!(
            d.steps,
            vec![
                // No default before FROM: none after.
                BuildStep::Arg {
                    name: "TAG".into(),
                    default: None
                },
                // The default before FROM carries over.
                BuildStep::Arg {
                    name: "REG".into(),
                    default: Some("127.0.0.1:5000".into())
                },
                BuildStep::Arg {
                    name: "OTHER".into(),
                    default: Some("x".into())
                },
            ]
        );
        let e = parse("ARG B\nFROM $B", &no_args()).unwrap_err();
        assert!(e.reason.contains("empty image reference"), "{e}");
    }

    #[test]
    fn refusals_name_the_line_and_the_instruction() {
        let cases: &[(&str, usize, &str)] = &[
            ("FROM scratch", 1, "FROM scratch is not supported"),
            ("FROM host\nRUN x\nFROM host AS two", 3, "multi-stage"),
            ("RUN echo\nFROM host", 1, "RUN before FROM"),
            ("FROM host\n\nCOPY --chown=1:1 a /b", 3, "COPY --chown"),
            ("FROM host\nCOPY --from=build /a /b", 2, "COPY --from"),
            ("FROM host\nCOPY a", 2, "at least one source"),
            ("FROM host\nCOPY ../etc/passwd /x", 2, "without `..`"),
            ("FROM host\nLABEL a=b", 2, "LABEL is not supported"),
            (
                "FROM host\nHEALTHCHECK CMD true",
                2,
                "HEALTHCHECK is not supported",
            ),
            ("FROM host\nADD x.tar /", 2, "use COPY"),
            (
                "FROM host\nFROBNICATE x",
                2,
                "unknown instruction FROBNICATE",
            ),
            (
                "FROM host\nRUN --mount=type=cache,target=/c make",
                2,
                "RUN flag --mount",
            ),
            ("FROM host\nRUN <<EOF\necho\nEOF", 2, "here-documents"),
            ("FROM host\nENV A=1 B", 2, "is not NAME=VALUE"),
            ("FROM host\nENV 1A=x", 2, "invalid ENV name"),
            ("FROM host\nARG a-b", 2, "invalid ARG name"),
            ("FROM host\nWORKDIR", 2, "WORKDIR needs a path"),
            ("FROM host\nENV A=\"open", 2, "unterminated"),
            (
                "FROM --platform=linux/amd64 host",
                1,
                "FROM flag --platform",
            ),
            ("# only a comment\n", 1, "no FROM"),
        ];
        for (text, line, why) in cases {
            let e = parse(text, &no_args()).unwrap_err();
            assert_eq!(e.line, *line, "{text:?}: {e}");
            assert!(e.to_string().contains(why), "{text:?}: {e}");
            assert!(e.to_string().contains(&format!("line {line}")), "{e}");
        }
    }

    #[test]
    fn continuations_report_their_first_line() {
        let e = parse("FROM host\nRUN a \\\n  b\nLABEL x=\\\n y", &no_args()).unwrap_err();
        assert_eq!(e.line, 4);
        assert_eq!(e.text, "LABEL x=y");
    }

    #[test]
    fn steps_without_from() {
        let s = parse_steps("RUN echo hi\nENV X=1\nARG V=2").unwrap();
        assert_eq!(
            s.steps,
            vec![
                BuildStep::Run {
                    argv: sh("echo hi")
                },
                BuildStep::Env {
                    vars: vars(&[("X", "1")])
                },
                BuildStep::Arg {
                    name: "V".into(),
                    default: Some("2".into())
                },
            ]
        );
        let e = parse_steps("RUN a\nFROM host").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("FROM is not allowed here"), "{e}");
    }

    #[test]
    fn words_and_escapes() {
        assert_eq!(
            shell_words(r#"a "b c" 'd e' f\ g "h\"i" \$lit "\$q""#).unwrap(),
            vec!["a", "b c", "d e", "f g", "h\"i", "\\$lit", "\\$q"]
        );
        assert_eq!(
            substitute(r"${A}-$B-\$C-$", |n| Some(n.to_lowercase())).unwrap(),
            "a-b-$C-$"
        );
    }
}
