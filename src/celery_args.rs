//! The `celery worker` options the operator sets or relies on, found in a user's argument list
//! (pure).
//!
//! `spec.worker.extraArgs` is appended to the command the operator builds; an option given there
//! again would win over the operator's (Celery, like any click program, takes the last) and
//! silently change what the operator scales on (`-Q`, `-c`) or matches heartbeats with (`-n`).
//! Options are read as click reads them (celery 5): `--name=value`, `--name value`, `-cVALUE`,
//! `-c VALUE`, and boolean short flags bundled (`-ED`). Click does not expand abbreviations.

/// One option the operator owns: its long names, its short letter, and what to use instead.
struct Owned {
    long: &'static [&'static str],
    short: Option<char>,
    what: &'static str,
    instead: &'static str,
}

const OWNED: &[Owned] = &[
    Owned { long: &["app"], short: Some('A'), what: "the Celery app", instead: "use spec.worker.app" },
    Owned {
        long: &["broker"],
        short: Some('b'),
        what: "the broker",
        instead: "the workers get CELERY_BROKER_URL from spec.broker.urlSecretRef",
    },
    Owned {
        long: &["queues"],
        short: Some('Q'),
        what: "the queues",
        instead: "use spec.queue and spec.extraQueues (the operator scales on those queues)",
    },
    Owned {
        long: &["exclude-queues"],
        short: Some('X'),
        what: "the queues",
        instead: "use spec.queue and spec.extraQueues (the operator scales on those queues)",
    },
    Owned {
        long: &["concurrency"],
        short: Some('c'),
        what: "the concurrency",
        instead: "use spec.worker.concurrency (the operator sizes replicas by it)",
    },
    Owned {
        long: &["autoscale"],
        short: None,
        what: "Celery's own autoscaler",
        instead: "set a fixed spec.worker.concurrency: the operator sizes pods by it, and the autoscaler would change it under the operator",
    },
    Owned {
        long: &["hostname"],
        short: Some('n'),
        what: "the worker's name",
        instead: "use spec.worker.nodeName (the operator finds each pod's worker by `<nodeName>@<pod name>`)",
    },
    Owned {
        long: &["prefetch-multiplier"],
        short: None,
        what: "the prefetch multiplier",
        instead: "use spec.worker.prefetchMultiplier",
    },
    Owned {
        long: &["without-heartbeat"],
        short: None,
        what: "no heartbeats",
        instead: "remove it: the operator reads the workers' heartbeats to keep busy pods on a scale-in",
    },
    Owned {
        long: &["detach"],
        short: Some('D'),
        what: "a detached worker",
        instead: "remove it: the worker must stay the container's foreground process",
    },
    Owned {
        long: &["beat"],
        short: Some('B'),
        what: "beat in every replica",
        instead: "remove it and run `celery beat` as its own one-replica Deployment: with -B each pod sends every periodic task",
    },
    Owned {
        long: &["purge", "discard"],
        short: None,
        what: "a purge at start",
        instead: "remove it: every new pod would delete all the messages waiting in its queues",
    },
];

/// Short options of `celery worker` that take a value (the rest of the word, or the next word).
const SHORT_WITH_VALUE: &str = "AbcfIlnOPQsSX";
/// Boolean short flags, which click lets a word bundle (`-ED`).
const SHORT_FLAGS: &str = "BDE";
/// Long options of `celery worker` that take a value, so the word after them is not an option.
const LONG_WITH_VALUE: &[&str] = &[
    "app",
    "broker",
    "hostname",
    "statedb",
    "loglevel",
    "optimization",
    "prefetch-multiplier",
    "concurrency",
    "pool",
    "time-limit",
    "soft-time-limit",
    "max-tasks-per-child",
    "pool-start-method",
    "max-memory-per-child",
    "queues",
    "exclude-queues",
    "include",
    "heartbeat-interval",
    "autoscale",
    "schedule-filename",
    "schedule",
    "scheduler",
    "logfile",
    "pidfile",
    "uid",
    "gid",
    "umask",
    "executable",
];

/// An owned option found in an argument list.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// Index of the word in the list.
    pub index: usize,
    pub message: String,
}

/// An option's name as written: `--name` or `-c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Name<'a> {
    Long(&'a str),
    Short(char),
}

/// One option of an argument list, read as click reads `celery worker`'s.
#[derive(Debug)]
struct Opt<'a> {
    /// Index of the word the option starts in.
    index: usize,
    name: Name<'a>,
    value: Option<&'a str>,
}

/// The options of `args`, in order: `--name=value`, `--name value` (for options that take a
/// value), `-cVALUE`, `-c VALUE` and bundled flags (`-ED`); a value word is not read as an
/// option, and `--` ends the options.
fn options(args: &[String]) -> Vec<Opt<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let (index, arg) = (i, args[i].as_str());
        if arg == "--" {
            break;
        }
        let mut next_word = || {
            i += 1;
            args.get(i).map(String::as_str)
        };
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = long.split_once('=').map_or((long, None), |(n, v)| (n, Some(v)));
            let value = match inline {
                Some(v) => Some(v),
                None if LONG_WITH_VALUE.contains(&name) => next_word(),
                None => None,
            };
            out.push(Opt { index, name: Name::Long(name), value });
        } else if let Some(letters) = arg.strip_prefix('-').filter(|l| !l.is_empty()) {
            for (j, c) in letters.char_indices() {
                if SHORT_WITH_VALUE.contains(c) {
                    let rest = &letters[j + c.len_utf8()..];
                    let value = if rest.is_empty() { next_word() } else { Some(rest) };
                    out.push(Opt { index, name: Name::Short(c), value });
                    break;
                }
                out.push(Opt { index, name: Name::Short(c), value: None });
                if !SHORT_FLAGS.contains(c) {
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

impl Name<'_> {
    fn is(&self, long: &[&str], short: Option<char>) -> bool {
        match *self {
            Name::Long(n) => long.contains(&n),
            Name::Short(c) => short == Some(c),
        }
    }
}

/// Every word of `args` that sets an option the operator owns.
pub fn refused_options(args: &[String]) -> Vec<Refused> {
    let mut out = Vec::new();
    for opt in options(args) {
        if let Some(o) = OWNED.iter().find(|o| opt.name.is(o.long, o.short)) {
            let arg = &args[opt.index];
            out.push(Refused {
                index: opt.index,
                message: format!("{arg:?} sets {}, which the operator owns; {}", o.what, o.instead),
            });
        }
    }
    out
}

/// What a `celery worker` command line says about what the operator relies on (read from a
/// Deployment it scales but did not write).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerCommand {
    /// `-Q`: None when not given (the app's default queue, `celery` unless `task_default_queue`
    /// says otherwise).
    pub queues: Option<Vec<String>>,
    /// `-X`: queues excluded.
    pub exclude: Vec<String>,
    /// `-c`, as written.
    pub concurrency: Option<String>,
    pub autoscale: bool,
    /// `-n`, as written.
    pub hostname: Option<String>,
    pub without_heartbeat: bool,
    pub beat: bool,
    pub detach: bool,
}

/// Global options of `celery` that take a value (before the subcommand).
const GLOBAL_WITH_VALUE: &[&str] =
    &["-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir"];

/// The `celery [global options] worker [options]` in `words` (a wrapper may come first:
/// `ddtrace-run celery …`, `python -m celery …`); None when no word starts a Celery worker.
pub fn read_worker(words: &[String]) -> Option<WorkerCommand> {
    let is_celery = |w: &str| w == "celery" || w.ends_with("/celery");
    let start = words.iter().position(|w| is_celery(w))?;
    // The first word after `celery` that is neither an option nor an option's value is the
    // subcommand.
    let mut i = start + 1;
    loop {
        let w = words.get(i)?.as_str();
        if w == "worker" {
            break;
        }
        if !w.starts_with('-') {
            return None; // beat, flower, inspect, ...
        }
        i += if GLOBAL_WITH_VALUE.contains(&w) { 2 } else { 1 };
    }
    let mut cmd = WorkerCommand::default();
    let list = |v: Option<&str>| -> Vec<String> {
        v.unwrap_or_default().split(',').map(str::trim).filter(|q| !q.is_empty()).map(String::from).collect()
    };
    for opt in options(&words[i + 1..]) {
        let n = opt.name;
        if n.is(&["queues"], Some('Q')) {
            cmd.queues = Some(list(opt.value));
        } else if n.is(&["exclude-queues"], Some('X')) {
            cmd.exclude = list(opt.value);
        } else if n.is(&["concurrency"], Some('c')) {
            cmd.concurrency = opt.value.map(String::from);
        } else if n.is(&["autoscale"], None) {
            cmd.autoscale = true;
        } else if n.is(&["hostname"], Some('n')) {
            cmd.hostname = opt.value.map(String::from);
        } else if n.is(&["without-heartbeat"], None) {
            cmd.without_heartbeat = true;
        } else if n.is(&["beat"], Some('B')) {
            cmd.beat = true;
        } else if n.is(&["detach"], Some('D')) {
            cmd.detach = true;
        }
    }
    Some(cmd)
}

/// What is wrong with `spec.worker.commandPrefix`, one message per problem word.
pub fn prefix_problems(prefix: &[String]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, word) in prefix.iter().enumerate() {
        if word.is_empty() || word.chars().any(char::is_control) {
            out.push((i, format!("{word:?} must be a non-empty word without control characters")));
        }
    }
    match prefix.last().map(String::as_str) {
        Some("celery") => {
            out.push((prefix.len() - 1, "\"celery\" is added by the operator after the prefix; remove it".to_string()))
        }
        Some("-c") if prefix.len() >= 2 => out.push((
            prefix.len() - 1,
            "a shell's -c takes one string, and the worker command is a list of words: use a script that ends with \
             `exec \"$@\"` (or drop the shell)"
                .to_string(),
        )),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(args: &[&str]) -> Vec<usize> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        refused_options(&args).into_iter().map(|r| r.index).collect()
    }

    #[test]
    fn every_spelling_of_an_owned_option_is_refused() {
        for args in [
            &["-Q", "other"][..],
            &["-Qother"],
            &["--queues=other"],
            &["--queues", "other"],
            &["-X", "celery"],
            &["-c", "8"],
            &["-c8"],
            &["--concurrency=8"],
            &["--autoscale=10,3"],
            &["-n", "x@%h"],
            &["--hostname=x"],
            &["--without-heartbeat"],
            &["--prefetch-multiplier", "1"],
            &["-D"],
            &["-ED"],
            &["-Ec4"],
            &["-B"],
            &["--purge"],
            &["--discard"],
            &["-A", "other.app"],
            &["-b", "redis://elsewhere"],
        ] {
            assert_eq!(refused(args), [0], "{args:?}");
        }
    }

    #[test]
    fn options_the_operator_does_not_own_pass() {
        for args in [
            &["-l", "info"][..],
            &["-linfo"],
            &["--loglevel=INFO"],
            &["-O", "fair"],
            &["-Ofair"],
            &["-P", "threads"],
            &["-Pthreads"],
            &["-E"],
            &["--max-tasks-per-child=100"],
            &["--max-memory-per-child", "200000"],
            &["--without-gossip", "--without-mingle"],
            &["--time-limit", "300", "--soft-time-limit", "270"],
            // The word after an option that takes a value is that value, not an option.
            &["--logfile", "-c"],
            &["-l", "-Q"],
            &["--", "-c", "8"],
            &["--concurrency-something"],
        ] {
            assert_eq!(refused(args), Vec::<usize>::new(), "{args:?}");
        }
    }

    #[test]
    fn each_refusal_names_the_word_and_the_field_to_use() {
        let r = refused_options(&["-l".into(), "info".into(), "-c".into(), "8".into()]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].index, 2);
        assert!(
            r[0].message.contains("\"-c\" sets the concurrency") && r[0].message.contains("spec.worker.concurrency")
        );
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_worker_command_is_read_after_any_wrapper() {
        let read = |s: &str| read_worker(&words(s));
        let full = read("ddtrace-run python -m celery -A app.worker --broker x worker -Qa,b -c4 -n w@%h -l info --without-heartbeat -B").unwrap();
        assert_eq!(full.queues, Some(vec!["a".to_string(), "b".into()]));
        assert_eq!(full.concurrency.as_deref(), Some("4"));
        assert_eq!(full.hostname.as_deref(), Some("w@%h"));
        assert!(full.without_heartbeat && full.beat && !full.autoscale && !full.detach);
        let long =
            read("/venv/bin/celery --app=app worker --queues=x --concurrency 8 --hostname=h@%h --autoscale=4,1 -X y")
                .unwrap();
        assert_eq!(
            (long.queues, long.concurrency.as_deref(), long.hostname.as_deref(), long.autoscale, long.exclude),
            (Some(vec!["x".to_string()]), Some("8"), Some("h@%h"), true, vec!["y".to_string()])
        );
        let bare = read("celery -A app worker --loglevel=INFO").unwrap();
        assert_eq!(bare, WorkerCommand::default());
        assert_eq!(read("celery -A app beat"), None, "beat is not a worker");
        assert_eq!(read("gunicorn app:wsgi"), None);
        assert_eq!(read("celery -A worker flower"), None, "-A takes `worker` as its value");
        assert_eq!(read("celery -A app worker -l -Q").unwrap().queues, None, "-Q is the value of -l");
    }

    #[test]
    fn prefixes() {
        let p = |words: &[&str]| {
            prefix_problems(&words.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .into_iter()
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        for ok in [&["ddtrace-run"][..], &["python", "-m"], &["uv", "run"], &["newrelic-admin", "run-program"], &[]] {
            assert!(p(ok).is_empty(), "{ok:?}");
        }
        assert_eq!(p(&["uv", "run", "celery"]), [2]);
        assert_eq!(p(&["sh", "-c"]), [1]);
        assert_eq!(p(&["", "x\n"]), [0, 1]);
    }
}
