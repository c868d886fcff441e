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

/// Every word of `args` that sets an option the operator owns.
pub fn refused_options(args: &[String]) -> Vec<Refused> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for (index, arg) in args.iter().enumerate() {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg == "--" {
            break;
        }
        let mut refuse = |o: &Owned| {
            out.push(Refused {
                index,
                message: format!("{arg:?} sets {}, which the operator owns; {}", o.what, o.instead),
            })
        };
        if let Some(long) = arg.strip_prefix("--") {
            let (name, value) = long.split_once('=').map_or((long, None), |(n, v)| (n, Some(v)));
            if let Some(o) = OWNED.iter().find(|o| o.long.contains(&name)) {
                refuse(o);
            }
            skip_value = value.is_none() && LONG_WITH_VALUE.contains(&name);
        } else if let Some(letters) = arg.strip_prefix('-').filter(|l| !l.is_empty()) {
            for (i, c) in letters.char_indices() {
                if let Some(o) = OWNED.iter().find(|o| o.short == Some(c)) {
                    refuse(o);
                }
                if SHORT_WITH_VALUE.contains(c) {
                    skip_value = i + c.len_utf8() == letters.len();
                    break;
                }
                if !SHORT_FLAGS.contains(c) {
                    break;
                }
            }
        }
    }
    out
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
