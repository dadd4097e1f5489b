//! End-to-end properties of the channel: the receiver accepts exactly the in-order stream.

use pipellm_core::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Data(Vec<u8>),
    Nop,
    /// A chunk sealed speculatively, then: delivered (None), replaced by a substitute
    /// (Some(Some(bytes))) or by a NOP (Some(None)).
    Speculate(Vec<u8>, Option<Option<Vec<u8>>>),
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => bytes().prop_map(Op::Data),
        1 => Just(Op::Nop),
        2 => (bytes(), proptest::option::of(proptest::option::of(bytes()))).prop_map(|(a, b)| Op::Speculate(a, b)),
    ]
}

/// Charge of a speculative position: room for a chunk of up to 300 bytes and its substitute.
const SPEC_CHARGE: u64 = 2 * (300 / 16 + 2);

fn ends(limit: u64) -> (Sender, Receiver) {
    let key = SessionKey::from_bytes(&[0x5Au8; 32]).unwrap();
    let policy = KeyPolicy {
        usage_limit: limit,
        rotate: true,
    };
    (
        Sender::new(&key, 3, Direction::HostToDevice, policy).unwrap(),
        Receiver::new(&key, 3, Direction::HostToDevice, policy).unwrap(),
    )
}

fn seal_all(tx: &Sender, ops: &[Op]) -> Vec<Message> {
    ops.iter()
        .map(|o| match o {
            Op::Data(d) => tx.seal(d).unwrap(),
            Op::Nop => tx.seal_nop().unwrap(),
            Op::Speculate(d, outcome) => {
                let mut buf = d.clone();
                let (sealed, fallback) = tx
                    .reserve(SPEC_CHARGE)
                    .unwrap()
                    .speculate_in_place(&mut buf)
                    .unwrap();
                match outcome {
                    None => {
                        let _delivered_so_unused = fallback;
                        Message::new(sealed.header, sealed.tag, buf).unwrap()
                    }
                    Some(Some(sub)) => {
                        let mut b = sub.clone();
                        let s = fallback.substitute_in_place(&mut b).unwrap();
                        assert_ne!(
                            s.header.iv(),
                            sealed.header.iv(),
                            "substitute reused the IV"
                        );
                        Message::new(s.header, s.tag, b).unwrap()
                    }
                    Some(None) => {
                        let n = fallback.into_nop().unwrap();
                        assert_ne!(n.iv(), sealed.header.iv(), "NOP reused the IV");
                        n
                    }
                }
            }
        })
        .collect()
}

fn expected_plain(o: &Op) -> Vec<u8> {
    match o {
        Op::Data(d) | Op::Speculate(d, None) => d.clone(),
        Op::Speculate(_, Some(Some(sub))) => sub.clone(),
        Op::Nop | Op::Speculate(_, Some(None)) => Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The in-order stream is accepted and decrypts to what was sealed, across rotations.
    #[test]
    fn in_order_stream_roundtrips(ops in proptest::collection::vec(op(), 1..40), limit in SPEC_CHARGE..400) {
        let (tx, mut rx) = ends(limit);
        let msgs = seal_all(&tx, &ops);
        for (m, o) in msgs.iter().zip(&ops) {
            let mut dst = vec![0u8; m.len()];
            rx.open_into(m.header(), m.tag(), m.ciphertext(), &mut dst).unwrap();
            prop_assert_eq!(&dst, &expected_plain(o));
        }
        prop_assert_eq!(rx.cursor(), tx.cursor());
    }

    /// Any delivery sequence (drops, duplicates, reorders): a delivery is accepted iff it is
    /// the next message of the stream; rejections change nothing.
    #[test]
    fn only_the_next_message_is_accepted(ops in proptest::collection::vec(op(), 1..20),
                                         deliveries in proptest::collection::vec(0usize..20, 0..60),
                                         limit in SPEC_CHARGE..400) {
        let (tx, mut rx) = ends(limit);
        let msgs = seal_all(&tx, &ops);
        let mut next = 0usize;
        for d in deliveries {
            let d = d % msgs.len();
            let m = &msgs[d];
            let mut dst = vec![0xEEu8; m.len()];
            let before = rx.cursor();
            let r = rx.open_into(m.header(), m.tag(), m.ciphertext(), &mut dst);
            if d == next {
                prop_assert!(r.is_ok(), "next message rejected: {:?}", r);
                prop_assert_eq!(&dst, &expected_plain(&ops[d]));
                next += 1;
            } else {
                let is_order_error = matches!(r, Err(Error::IvOrder { .. }));
                prop_assert!(is_order_error, "out-of-order delivery of {} (expected {}) gave {:?}", d, next, r);
                prop_assert_eq!(rx.cursor(), before);
                prop_assert!(dst.iter().all(|&b| b == 0xEE), "rejected message wrote to dst");
            }
        }
    }

    /// Any single-bit flip anywhere in the next message's wire bytes is rejected, leaves the
    /// receiver unchanged and writes nothing; the untouched message is then still accepted.
    #[test]
    fn any_bit_flip_is_rejected(ops in proptest::collection::vec(op(), 1..6), pick in any::<prop::sample::Index>(), bit in any::<prop::sample::Index>()) {
        let (tx, mut rx) = ends(1 << 20);
        let msgs = seal_all(&tx, &ops);
        let target = pick.index(msgs.len());
        for m in &msgs[..target] {
            rx.open(m).unwrap();
        }
        let wire = msgs[target].to_wire();
        let mut bad = wire.clone();
        let b = bit.index(wire.len() * 8);
        bad[b / 8] ^= 1 << (b % 8);
        let before = rx.cursor();
        if let Ok(parsed) = Message::from_wire(&bad) {
            let mut dst = vec![0x11u8; parsed.len()];
            let r = rx.open_into(parsed.header(), parsed.tag(), parsed.ciphertext(), &mut dst);
            prop_assert!(r.is_err(), "flipped bit {} accepted", b);
            prop_assert!(dst.iter().all(|&x| x == 0x11));
            let r2 = rx.open(&parsed);
            prop_assert!(r2.is_err());
        }
        prop_assert_eq!(rx.cursor(), before);
        let good = Message::from_wire(&wire).unwrap();
        prop_assert_eq!(rx.open(&good).unwrap(), expected_plain(&ops[target]));
    }
}

#[test]
fn message_for_another_channel_or_direction_is_rejected() {
    let key = SessionKey::generate().unwrap();
    let p = KeyPolicy::default();
    let tx = Sender::new(&key, 1, Direction::HostToDevice, p).unwrap();
    let m = tx.seal(b"weights").unwrap();
    let mut other_ch = Receiver::new(&key, 2, Direction::HostToDevice, p).unwrap();
    let mut other_dir = Receiver::new(&key, 1, Direction::DeviceToHost, p).unwrap();
    assert!(matches!(other_ch.open(&m), Err(Error::Authentication(_))));
    assert!(matches!(other_dir.open(&m), Err(Error::Authentication(_))));
    // Rewriting the carried channel does not help: the AAD no longer matches.
    let mut h = *m.header();
    h.channel = 2;
    let forged = Message::new(h, *m.tag(), m.ciphertext().to_vec()).unwrap();
    assert!(matches!(
        other_ch.open(&forged),
        Err(Error::Authentication(_))
    ));
}

#[test]
fn wrong_key_is_rejected() {
    let p = KeyPolicy::default();
    let tx = Sender::new(
        &SessionKey::generate().unwrap(),
        0,
        Direction::HostToDevice,
        p,
    )
    .unwrap();
    let mut rx = Receiver::new(
        &SessionKey::generate().unwrap(),
        0,
        Direction::HostToDevice,
        p,
    )
    .unwrap();
    assert!(matches!(
        rx.open(&tx.seal(&[1, 2, 3]).unwrap()),
        Err(Error::Authentication(_))
    ));
}

#[test]
fn rotation_changes_the_key_and_both_ends_follow() {
    let (tx, mut rx) = ends(64); // 64 units: three 256-byte messages (17 units each) per epoch
    let mut epochs = vec![];
    for i in 0..10u8 {
        let m = tx.seal(&[i; 256]).unwrap();
        epochs.push(m.position().epoch);
        assert_eq!(rx.open(&m).unwrap(), vec![i; 256]);
    }
    assert_eq!(epochs, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
    // A NOP burning a larger reservation carries its charge: the receiver rotates with it.
    let r = tx.reserve(60).unwrap();
    let nop = r.into_nop().unwrap();
    assert_eq!(
        nop.position(),
        Position {
            epoch: 4,
            counter: 0
        }
    );
    rx.open(&nop).unwrap();
    assert_eq!(rx.cursor(), tx.cursor());
}

#[test]
fn exhaustion_without_rotation_is_typed_on_both_ends() {
    let key = SessionKey::generate().unwrap();
    let p = KeyPolicy {
        usage_limit: 40,
        rotate: false,
    };
    let tx = Sender::new(&key, 0, Direction::HostToDevice, p).unwrap();
    let mut rx = Receiver::new(&key, 0, Direction::HostToDevice, p).unwrap();
    rx.open(&tx.seal(&[0u8; 16 * 19]).unwrap()).unwrap(); // 20 units
    rx.open(&tx.seal(&[0u8; 16 * 19]).unwrap()).unwrap(); // 40 units
    assert!(matches!(tx.seal(&[0u8; 1]), Err(Error::IvExhausted(_))));
    assert!(matches!(tx.seal_nop(), Err(Error::IvExhausted(_))));
    // A sender that ignored the limit (here: one with a laxer policy) is refused by the receiver.
    let lax = Sender::new(
        &key,
        0,
        Direction::HostToDevice,
        KeyPolicy {
            usage_limit: 1000,
            rotate: false,
        },
    )
    .unwrap();
    for _ in 0..2 {
        let _ = lax.seal(&[0u8; 16 * 19]).unwrap();
    }
    assert!(matches!(
        rx.open(&lax.seal(&[0u8; 1]).unwrap()),
        Err(Error::IvExhausted(_))
    ));
}

#[test]
fn open_into_rejects_wrong_destination_length() {
    let (tx, mut rx) = ends(1 << 20);
    let m = tx.seal(&[7u8; 100]).unwrap();
    let mut small = vec![0u8; 99];
    assert!(matches!(
        rx.open_into(m.header(), m.tag(), m.ciphertext(), &mut small),
        Err(Error::InvalidLength(_))
    ));
    let mut ok = vec![0u8; 100];
    rx.open_into(m.header(), m.tag(), m.ciphertext(), &mut ok)
        .unwrap();
    assert_eq!(ok, vec![7u8; 100]);
}

#[test]
fn withheld_epoch_tail_is_detected() {
    let (tx, mut rx) = ends(100);
    let m0 = tx.seal(&[0u8; 16 * 49]).unwrap(); // 50 units
    let m1 = tx.seal(&[0u8; 16 * 19]).unwrap(); // 20 units
    let m2 = tx.seal(&[0u8; 16 * 59]).unwrap(); // 60 units: opens epoch 1
    rx.open(&m0).unwrap();
    match rx.open(&m2) {
        Err(Error::IvOrder {
            violation:
                OrderViolation::EpochTruncated {
                    sent: 2,
                    received: 1,
                },
            ..
        }) => {}
        other => panic!("expected EpochTruncated, got {other:?}"),
    }
    rx.open(&m1).unwrap();
    rx.open(&m2).unwrap();
}

#[test]
fn a_position_accepts_one_of_speculative_substitute_or_nop() {
    let (tx, mut rx) = ends(1 << 20);
    let mut spec = vec![1u8; 100];
    let (sealed, fallback) = tx
        .reserve(40)
        .unwrap()
        .speculate_in_place(&mut spec)
        .unwrap();
    let spec_msg = Message::new(sealed.header, sealed.tag, spec).unwrap();
    let mut sub = vec![2u8; 100];
    let s = fallback.substitute_in_place(&mut sub).unwrap();
    let sub_msg = Message::new(s.header, s.tag, sub).unwrap();
    assert_eq!(sub_msg.position(), spec_msg.position());
    assert_eq!(rx.open(&sub_msg).unwrap(), vec![2u8; 100]);
    // The speculative chunk of the same position is now a replay.
    assert!(matches!(
        rx.open(&spec_msg),
        Err(Error::IvOrder {
            violation: OrderViolation::Replay,
            ..
        })
    ));
    // A substitute relabelled as data (or the reverse) fails: the IV variant differs.
    let m = tx.seal(&[5u8; 10]).unwrap();
    let mut h = *m.header();
    h.kind = Kind::Substitute;
    let relabelled = Message::new(h, *m.tag(), m.ciphertext().to_vec()).unwrap();
    assert!(matches!(
        rx.open(&relabelled),
        Err(Error::Authentication(_))
    ));
    assert_eq!(rx.open(&m).unwrap(), vec![5u8; 10]);
}

#[test]
fn speculation_needs_room_for_a_fallback() {
    let (tx, _) = ends(1 << 20);
    let r = tx.reserve(pipellm_core::header::data_charge(100)).unwrap();
    let mut buf = vec![0u8; 100];
    let back = r.speculate_in_place(&mut buf).unwrap_err();
    assert!(matches!(back.error, Error::InvalidLength(_)));
    assert_eq!(
        buf,
        vec![0u8; 100],
        "a refused speculation must not encrypt"
    );
    assert!(back.token.into_nop().unwrap().is_nop());
}
