//! kombu's Redis key layout (reference §1.1): queue Q at priority step s lives in the list
//! `prefix + Q` when s == 0, else `prefix + Q + sep + s`.

use crate::crd::TransportOptions;

/// One queue to measure, with the key layout its Celery app uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DepthQuery {
    pub queue: String,
    pub prefix: String,
    pub sep: String,
    pub steps: Vec<u8>,
}

impl DepthQuery {
    pub fn new(queue: &str, opts: &TransportOptions) -> Self {
        Self {
            queue: queue.to_string(),
            prefix: opts.global_keyprefix.clone(),
            sep: opts.sep.clone(),
            steps: opts.priority_steps.clone(),
        }
    }

    /// `(step, key)` for every priority list of this queue, in step order as configured.
    pub fn keys(&self) -> Vec<(u8, Vec<u8>)> {
        self.steps.iter().map(|&s| (s, self.key(s))).collect()
    }

    /// The list of priority step `step`.
    pub fn key(&self, step: u8) -> Vec<u8> {
        let key = if step == 0 {
            format!("{}{}", self.prefix, self.queue)
        } else {
            format!("{}{}{}{}", self.prefix, self.queue, self.sep, step)
        };
        key.into_bytes()
    }

    /// kombu's binding set of the queue's own exchange (Celery's automatic queues), written by
    /// every worker that consumes the queue and every producer that declares it.
    pub fn binding_key(&self) -> String {
        format!("{}_kombu.binding.{}", self.prefix, self.queue)
    }

    /// Which separator the members of [`Self::binding_key`] were written with: kombu writes
    /// `routing_key SEP pattern SEP queue`, i.e. `Q SEP SEP Q` for Celery's automatic queue.
    pub fn separator_seen(&self, members: &[Vec<u8>]) -> Separator {
        let q = self.queue.as_bytes();
        let mut other = None;
        for m in members {
            let Some(middle) = m.strip_prefix(q).and_then(|r| r.strip_suffix(q)) else { continue };
            let (a, b) = middle.split_at(middle.len() / 2);
            if middle.len() % 2 != 0 || a != b {
                continue; // a routing key or pattern of its own: not the automatic binding
            }
            if a == self.sep.as_bytes() {
                return Separator::Matches;
            }
            other = Some(String::from_utf8_lossy(a).into_owned());
        }
        other.map_or(Separator::Unknown, Separator::Other)
    }
}

/// What a queue's binding says of kombu's `sep`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Separator {
    Matches,
    /// Written with this separator instead.
    Other(String),
    /// No automatic binding seen.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_tells_the_separator_it_was_written_with() {
        let q = DepthQuery::new("mail", &TransportOptions::default());
        assert_eq!(q.binding_key(), "_kombu.binding.mail");
        assert_eq!(q.separator_seen(&[b"mail\x06\x16\x06\x16mail".to_vec()]), Separator::Matches);
        assert_eq!(q.separator_seen(&[b"mail::mail".to_vec()]), Separator::Other(":".into()));
        assert_eq!(
            q.separator_seen(&[b"rk\x06\x16\x06\x16mail".to_vec(), b"mail:x:mail".to_vec()]),
            Separator::Unknown
        );
        assert_eq!(q.separator_seen(&[]), Separator::Unknown);
        let colon = TransportOptions { sep: ":".into(), global_keyprefix: "p:".into(), ..TransportOptions::default() };
        let q = DepthQuery::new("mail", &colon);
        assert_eq!(q.binding_key(), "p:_kombu.binding.mail");
        assert_eq!(
            q.separator_seen(&[b"mail::mail".to_vec(), b"mail\x06\x16\x06\x16mail".to_vec()]),
            Separator::Matches,
            "one of the members matches (both apps write there)"
        );
    }

    #[test]
    fn default_layout_matches_kombu() {
        let keys = DepthQuery::new("celery", &TransportOptions::default()).keys();
        let want: Vec<(u8, Vec<u8>)> = vec![
            (0, b"celery".to_vec()),
            (3, b"celery\x06\x163".to_vec()),
            (6, b"celery\x06\x166".to_vec()),
            (9, b"celery\x06\x169".to_vec()),
        ];
        assert_eq!(keys, want);
    }

    #[test]
    fn prefix_sep_and_steps_are_honoured() {
        let opts = TransportOptions {
            global_keyprefix: "pfx:".into(),
            priority_steps: vec![0, 1, 5, 9],
            sep: ":".into(),
            master_name: None,
        };
        let keys: Vec<String> =
            DepthQuery::new("alpha", &opts).keys().into_iter().map(|(_, k)| String::from_utf8(k).unwrap()).collect();
        assert_eq!(keys, ["pfx:alpha", "pfx:alpha:1", "pfx:alpha:5", "pfx:alpha:9"]);
        // Steps without 0: no bare key (kombu maps priority 0 to the last step then).
        let opts = TransportOptions { priority_steps: vec![1, 5], ..TransportOptions::default() };
        let keys: Vec<Vec<u8>> = DepthQuery::new("q", &opts).keys().into_iter().map(|(_, k)| k).collect();
        assert_eq!(keys, vec![b"q\x06\x161".to_vec(), b"q\x06\x165".to_vec()]);
    }
}
