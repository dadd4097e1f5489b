//! Half-open address ranges `[start, end)`: the one convention for "does this memory overlap
//! that" in the workspace. Registries store ranges as `(start, end)`; a `(pointer, length)`
//! pair becomes one once, at the boundary ([`Span::of`], which saturates instead of
//! wrapping). Pure arithmetic, so also usable in signal context.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub const fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// `[start, start + len)`, ending at the top of the address space if it would wrap.
    pub const fn of(start: usize, len: usize) -> Self {
        Self::new(start, start.saturating_add(len))
    }

    /// True if the two share a byte (an empty range shares none).
    pub const fn overlaps(self, other: Span) -> bool {
        self.start < other.end
            && other.start < self.end
            && self.start < self.end
            && other.start < other.end
    }

    /// True if every byte of `other` is in `self`.
    pub const fn contains(self, other: Span) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// True if the byte at `addr` is in `self`.
    pub const fn contains_addr(self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }
}

#[cfg(test)]
mod tests {
    use super::Span;

    #[test]
    fn half_open_ranges() {
        let a = Span::new(10, 20);
        assert!(a.overlaps(Span::new(19, 30)) && a.overlaps(Span::new(0, 11)));
        assert!(!a.overlaps(Span::new(20, 30)) && !a.overlaps(Span::new(0, 10)));
        assert!(
            !a.overlaps(Span::new(15, 15)),
            "an empty range overlaps nothing"
        );
        assert!(a.contains(Span::new(10, 20)) && a.contains(Span::new(12, 13)));
        assert!(!a.contains(Span::new(9, 12)) && !a.contains(Span::new(19, 21)));
        assert!(a.contains_addr(10) && a.contains_addr(19) && !a.contains_addr(20));
        assert_eq!(
            Span::of(usize::MAX - 1, 10),
            Span::new(usize::MAX - 1, usize::MAX)
        );
    }
}
