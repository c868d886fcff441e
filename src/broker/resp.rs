//! A bound on every reply a broker sends, checked on the bytes as they arrive.
//!
//! redis-rs reads a reply whole, and takes a bulk string's or an array's length from the
//! broker's header: a broker (or anyone who can PUBLISH to it) that announces a 2 GB string
//! makes the reader allocate and wait for 2 GB. [`Framer`] follows RESP2's framing byte by byte
//! without keeping any of it, and rejects a reply as soon as its header or its running size
//! passes the bound; [`super::dial::Bounded`] runs it on every connection's incoming bytes
//! before redis-rs sees them. It keeps no payload: its state is a stack of open array counts.

/// What a broker's replies may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one reply (a pipeline's replies count one by one; a pub/sub message is one).
    pub max_reply: usize,
    /// Nesting of arrays (the operator's replies nest at most two deep: a pipeline's ZRANGE
    /// pages, pub/sub messages).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_reply: DEFAULT_MAX_REPLY, max_depth: 8 }
    }
}

/// 1 MiB: a page of 10 000 delivery tags (kombu's are UUIDs, ~43 bytes each in a reply) is
/// 430 KB; a Celery heartbeat is under 1 KiB. A reply just within the bound costs the process
/// a few times the bound while redis-rs buffers it (measured: ~7 MiB per connection at 4 MiB),
/// so the bound is kept small.
pub const DEFAULT_MAX_REPLY: usize = 1 << 20;

/// Why a reply was refused; the connection it came on is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    // The size is the peer's own header: not repeated.
    #[error("a reply over the bound of {bound} bytes (--max-broker-reply)")]
    TooLarge { size: u64, bound: usize },
    #[error("a reply nested more than {bound} arrays deep")]
    TooDeep { bound: usize },
    // The byte itself is not repeated: a message must not show what answers at an address.
    #[error("bytes that are not a Redis reply")]
    NotResp { byte: u8 },
    #[error("a malformed Redis reply header")]
    BadHeader,
    #[error("a reply line of more than {bound} bytes")]
    LongLine { bound: u64 },
}

/// The longest length header a well-formed reply has (`-9223372036854775808`).
const MAX_DIGITS: usize = 20;

/// The longest `+`, `-` or `:` line taken (Redis's are an `OK`, a number or an error sentence).
/// redis-rs buffers a line whole and, measured, costs several times its length while it
/// grows: an endless line cut at a 4 MiB reply bound cost the process ~12 MiB per connection.
pub const MAX_LINE: u64 = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for a reply's type byte.
    Start,
    /// Inside a `+`, `-` or `:` line, up to its `\n`: its bytes so far.
    Line(u64),
    /// Inside a `$` or `*` header: its sign and digits so far.
    Length { bulk: bool, negative: bool, value: u64, digits: usize },
    /// Inside a bulk string: payload and CRLF bytes still to come.
    Skip(u64),
}

/// Follows replies as they stream in (see the module docs).
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    state: State,
    /// Elements still to come in each open array, innermost last.
    open: Vec<u64>,
    /// Bytes of the reply under way.
    size: u64,
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Self { limits, state: State::Start, open: Vec::new(), size: 0 }
    }

    /// Follow `bytes`, the next bytes of the connection. Once it has failed, the connection must
    /// be dropped: the framer is no longer in step with it.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Rejected> {
        while !bytes.is_empty() {
            if let State::Skip(left) = self.state {
                let n = left.min(bytes.len() as u64);
                bytes = &bytes[n as usize..];
                if n == left {
                    self.state = State::Start;
                    self.element_done();
                } else {
                    self.state = State::Skip(left - n);
                }
                continue;
            }
            let byte = bytes[0];
            bytes = &bytes[1..];
            self.grow(1)?;
            self.step(byte)?;
        }
        Ok(())
    }

    /// Whether the framer sits between two replies.
    pub fn idle(&self) -> bool {
        self.state == State::Start && self.open.is_empty()
    }

    fn grow(&mut self, n: u64) -> Result<(), Rejected> {
        self.size += n;
        self.check(self.size)
    }

    fn check(&self, size: u64) -> Result<(), Rejected> {
        if size > self.limits.max_reply as u64 {
            return Err(Rejected::TooLarge { size, bound: self.limits.max_reply });
        }
        Ok(())
    }

    fn step(&mut self, byte: u8) -> Result<(), Rejected> {
        match self.state {
            State::Start => {
                self.state = match byte {
                    b'+' | b'-' | b':' => State::Line(0),
                    b'$' => State::Length { bulk: true, negative: false, value: 0, digits: 0 },
                    b'*' => State::Length { bulk: false, negative: false, value: 0, digits: 0 },
                    _ => return Err(Rejected::NotResp { byte }),
                }
            }
            State::Line(n) => {
                if byte == b'\n' {
                    self.state = State::Start;
                    self.element_done();
                } else if n >= MAX_LINE {
                    return Err(Rejected::LongLine { bound: MAX_LINE });
                } else {
                    self.state = State::Line(n + 1);
                }
            }
            State::Length { bulk, negative, value, digits } => match byte {
                b'-' if digits == 0 && !negative => self.state = State::Length { bulk, negative: true, value, digits },
                b'0'..=b'9' if digits < MAX_DIGITS => {
                    let value = value.saturating_mul(10).saturating_add(u64::from(byte - b'0'));
                    self.state = State::Length { bulk, negative, value, digits: digits + 1 };
                }
                b'\r' if digits > 0 => {}
                b'\n' if digits > 0 => self.header_done(bulk, negative, value)?,
                _ => return Err(Rejected::BadHeader),
            },
            State::Skip(_) => unreachable!("handled in feed"),
        }
        Ok(())
    }

    /// A `$n` or `*n` header is complete: refuse it before any of what it announces arrives.
    fn header_done(&mut self, bulk: bool, negative: bool, n: u64) -> Result<(), Rejected> {
        self.state = State::Start;
        if negative || n == 0 && !bulk {
            // A null, or an empty array: complete as it stands.
            self.element_done();
            return Ok(());
        }
        if bulk {
            // The payload and its CRLF.
            let skip = n.saturating_add(2);
            self.check(self.size.saturating_add(skip))?;
            self.size += skip;
            self.state = State::Skip(skip);
            return Ok(());
        }
        // Every element takes at least 3 bytes (`+\r\n`).
        self.check(self.size.saturating_add(n.saturating_mul(3)))?;
        if self.open.len() >= self.limits.max_depth {
            return Err(Rejected::TooDeep { bound: self.limits.max_depth });
        }
        self.open.push(n);
        Ok(())
    }

    /// One element ended: count it off its array, closing every array it completes; the end
    /// of the outermost one ends the reply.
    fn element_done(&mut self) {
        while let Some(left) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.open.pop();
        }
        self.size = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_reply: usize) -> Limits {
        Limits { max_reply, max_depth: 4 }
    }

    /// Feed `bytes` split at every position: the verdict must not depend on how reads cut them.
    fn verdicts(bytes: &[u8], l: Limits) -> Result<bool, Rejected> {
        let whole = {
            let mut f = Framer::new(l);
            f.feed(bytes).map(|()| f.idle())
        };
        for cut in 0..bytes.len() {
            let mut f = Framer::new(l);
            let split = f.feed(&bytes[..cut]).and_then(|()| f.feed(&bytes[cut..])).map(|()| f.idle());
            assert_eq!(split, whole, "cut at {cut}");
        }
        let mut f = Framer::new(l);
        let bytewise = bytes.iter().try_for_each(|b| f.feed(std::slice::from_ref(b))).map(|()| f.idle());
        assert_eq!(bytewise, whole, "byte by byte");
        whole
    }

    #[test]
    fn well_formed_replies_pass_and_end_idle() {
        let pipeline: &[u8] =
            b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*-1\r\n*0\r\n*2\r\n$1\r\n0\r\n*2\r\n$3\r\ntag\r\n$0\r\n\r\n-ERR no\r\n";
        assert_eq!(verdicts(pipeline, limits(64)), Ok(true));
        assert_eq!(verdicts(b"*2\r\n$1\r\n0\r\n", limits(64)), Ok(false), "a reply cut short is under way");
    }

    #[test]
    fn the_bound_is_per_reply() {
        // Ten replies of 20 bytes each under a bound of 32: each is within it.
        let many = b"$13\r\nthirteen-byte\r\n".repeat(10);
        assert_eq!(verdicts(&many, limits(32)), Ok(true));
        let one = b"*10\r\n".iter().chain(&many).copied().collect::<Vec<u8>>();
        assert_eq!(
            verdicts(&one, limits(32)),
            Err(Rejected::TooLarge { size: 35, bound: 32 }),
            "10 elements need 30 bytes or more"
        );
    }

    #[test]
    fn a_huge_header_is_refused_before_its_payload() {
        let mut f = Framer::new(limits(1024));
        assert_eq!(f.feed(b"$2147483648\r\n"), Err(Rejected::TooLarge { size: 2_147_483_663, bound: 1024 }));
        let mut f = Framer::new(limits(1024));
        assert_eq!(f.feed(b"*2147483648\r\n"), Err(Rejected::TooLarge { size: 6_442_450_957, bound: 1024 }));
        let mut f = Framer::new(limits(1024));
        assert!(matches!(f.feed(b"*99999999999999999999999\r\n"), Err(Rejected::BadHeader)));
    }

    #[test]
    fn deep_nesting_bytes_that_are_not_resp_and_bad_headers_are_refused() {
        assert_eq!(verdicts(&b"*1\r\n".repeat(5), limits(1024)), Err(Rejected::TooDeep { bound: 4 }));
        assert_eq!(verdicts(b"HTTP/1.1 400 Bad Request\r\n", limits(1024)), Err(Rejected::NotResp { byte: b'H' }));
        for bad in [&b"$\r\n"[..], b"$1x\r\n", b"*--1\r\n", b"$\n"] {
            assert_eq!(verdicts(bad, limits(1024)), Err(Rejected::BadHeader), "{bad:?}");
        }
        // A line without an end grows until the bound, or until the line bound.
        assert_eq!(verdicts(&[b'+'; 40], limits(32)), Err(Rejected::TooLarge { size: 33, bound: 32 }));
        let mut line = vec![b'-'; MAX_LINE as usize + 1];
        assert_eq!(Framer::new(limits(1 << 20)).feed(&line), Ok(()), "{MAX_LINE} bytes of a line: under way");
        line.push(b'x');
        assert_eq!(Framer::new(limits(1 << 20)).feed(&line), Err(Rejected::LongLine { bound: MAX_LINE }));
    }

    #[test]
    fn random_bytes_never_panic_and_random_replies_pass() {
        let mut rand = crate::xorshift(0x5eed);
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..rand(64)).map(|_| b"+-:$*0123456789\r\nx-"[rand(19) as usize]).collect();
            let _ = Framer::new(limits(256)).feed(&bytes);
        }
        for _ in 0..500 {
            let mut reply = Vec::new();
            random_reply(&mut rand, &mut reply, 0);
            assert_eq!(verdicts(&reply, limits(1 << 20)), Ok(true), "{:?}", String::from_utf8_lossy(&reply));
        }
    }

    fn random_reply(rand: &mut impl FnMut(u64) -> i64, out: &mut Vec<u8>, depth: usize) {
        match rand(if depth < 3 { 6 } else { 5 }) {
            0 => out.extend_from_slice(b"+OK\r\n"),
            1 => out.extend_from_slice(format!(":{}\r\n", rand(1000) - 500).as_bytes()),
            2 => out.extend_from_slice(b"$-1\r\n"),
            3 => out.extend_from_slice(b"-ERR x\r\n"),
            4 => {
                let n = rand(40) as usize;
                out.extend_from_slice(format!("${n}\r\n").as_bytes());
                out.extend(std::iter::repeat_n(b'\n', n));
                out.extend_from_slice(b"\r\n");
            }
            _ => {
                let n = rand(4);
                out.extend_from_slice(format!("*{n}\r\n").as_bytes());
                for _ in 0..n {
                    random_reply(rand, out, depth + 1);
                }
            }
        }
    }
}
