//! The receiver model under hostile input: a sender's genuine messages delivered in any
//! order, repeated, bit-flipped, truncated, or replaced by arbitrary bytes.
//!
//! Invariants: the receiver accepts a message only if its wire bytes are exactly those of the
//! genuine message at the position it expects next (then the plaintext is the original);
//! every rejection is a typed error and leaves the receiver where it was; nothing panics.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pipellm_core::{Direction, KeyPolicy, Message, Receiver, Sender, SessionKey};

#[derive(Arbitrary, Debug)]
enum Op {
    Deliver { index: u8 },
    Flip { index: u8, at: u16, xor: u8 },
    Truncate { index: u8, keep: u16 },
    Extend { index: u8, extra: u8 },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    key: [u8; 32],
    /// Message lengths (None: a NOP), at most 24 messages.
    messages: Vec<Option<u16>>,
    usage_limit: u16,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let Ok(key) = SessionKey::from_bytes(&input.key) else {
        return;
    };
    let policy = KeyPolicy {
        usage_limit: (input.usage_limit as u64).max(2) << 4,
        rotate: true,
    };
    let Ok(tx) = Sender::new(&key, 7, Direction::HostToDevice, policy) else {
        return;
    };
    let Ok(mut rx) = Receiver::new(&key, 7, Direction::HostToDevice, policy) else {
        return;
    };
    let mut genuine: Vec<(Vec<u8>, Vec<u8>)> = Vec::new(); // (wire, plaintext)
    for (i, m) in input.messages.iter().take(24).enumerate() {
        let (msg, plain) = match m {
            Some(n) => {
                let plain: Vec<u8> = (0..*n as usize % 3000)
                    .map(|j| (i * 31 + j) as u8)
                    .collect();
                match tx.seal(&plain) {
                    Ok(msg) => (msg, plain),
                    Err(_) => break, // too large for the usage limit: a typed error
                }
            }
            None => match tx.seal_nop() {
                Ok(msg) => (msg, Vec::new()),
                Err(_) => break,
            },
        };
        genuine.push((msg.to_wire(), plain));
    }
    if genuine.is_empty() {
        return;
    }
    let mut next = 0usize; // index of the genuine message the receiver expects
    for op in input.ops.iter().take(64) {
        let wire = match op {
            Op::Deliver { index } => genuine[*index as usize % genuine.len()].0.clone(),
            Op::Flip { index, at, xor } => {
                let mut w = genuine[*index as usize % genuine.len()].0.clone();
                let at = *at as usize % w.len();
                w[at] ^= xor.max(&1);
                w
            }
            Op::Truncate { index, keep } => {
                let w = &genuine[*index as usize % genuine.len()].0;
                w[..*keep as usize % w.len()].to_vec()
            }
            Op::Extend { index, extra } => {
                let mut w = genuine[*index as usize % genuine.len()].0.clone();
                w.extend(std::iter::repeat(*extra).take(1 + *extra as usize % 7));
                w
            }
            Op::Raw(bytes) => bytes.clone(),
        };
        let Ok(m) = Message::from_wire(&wire) else {
            continue;
        };
        let before = rx.cursor();
        match rx.open(&m) {
            Ok(plain) => {
                assert!(
                    next < genuine.len(),
                    "accepted a message the sender never made"
                );
                assert_eq!(
                    wire, genuine[next].0,
                    "accepted bytes that are not the expected message"
                );
                assert_eq!(plain, genuine[next].1);
                next += 1;
            }
            Err(_) => assert_eq!(rx.cursor(), before, "a rejection changed the receiver"),
        }
    }
});
