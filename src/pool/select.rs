//! Smooth weighted round robin (nginx's algorithm) over a pool's eligible back ends.
//!
//! Each pick adds every eligible back end's weight to its `current` value, picks the
//! largest `current` (the first in config order on ties) and subtracts the total of
//! the eligible weights from the winner. With every back end eligible, any window of
//! `W = Σ weights` consecutive picks gives each back end exactly its weight, and the
//! picks are interleaved (5:1:1 gives `a a b a c a a`; 11:1 sends the small back end
//! exactly every 12th request), unlike a round robin over a list that repeats each
//! back end `weight` times, which sends bursts.
//!
//! Invariants: a back end with weight 0 or that the caller marks ineligible is never
//! picked and its `current` is left untouched; `current` values stay bounded (they
//! sum to 0 after every pick with a fixed eligible set and each stays above −W, so
//! |current| < n·W), so they never overflow an `i64`.

/// The selector's state: one `current` value per back end, in config order.
#[derive(Debug, Clone, Default)]
pub struct SmoothWrr {
    current: Vec<i64>,
}

impl SmoothWrr {
    /// A selector for `n` back ends, all starting at 0.
    pub fn new(n: usize) -> Self {
        SmoothWrr {
            current: vec![0; n],
        }
    }

    /// Number of back ends this selector tracks.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether it tracks no back end.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Picks one back end. `weight(i)` gives back end `i`'s effective weight, or 0 when
    /// it is not eligible right now (drained, down, full). Returns `None` when no back
    /// end has a positive weight.
    pub fn pick(&mut self, mut weight: impl FnMut(usize) -> u32) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        let mut best_current = i64::MIN;
        for (i, current) in self.current.iter_mut().enumerate() {
            let w = i64::from(weight(i));
            if w == 0 {
                continue;
            }
            *current += w;
            total += w;
            if *current > best_current {
                best_current = *current;
                best = Some(i);
            }
        }
        let i = best?;
        self.current[i] -= total;
        Some(i)
    }

    /// A selector resuming from saved `current` values (a reload keeps each back
    /// end's value by name, so the interleaving continues where it was).
    pub fn with_current(current: Vec<i64>) -> Self {
        SmoothWrr { current }
    }

    /// Back end `i`'s current value.
    pub fn current(&self, i: usize) -> i64 {
        self.current.get(i).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn picks(weights: &[u32], n: usize) -> Vec<usize> {
        let mut s = SmoothWrr::new(weights.len());
        (0..n)
            .map(|_| s.pick(|i| weights[i]).expect("some weight > 0"))
            .collect()
    }

    #[test]
    fn five_one_one_is_interleaved_like_nginx() {
        let names: String = picks(&[5, 1, 1], 7)
            .into_iter()
            .map(|i| (b'a' + i as u8) as char)
            .collect();
        assert_eq!(names, "aabacaa");
    }

    #[test]
    fn eleven_to_one_sends_every_twelfth() {
        let p = picks(&[11, 1], 1200);
        let small: Vec<usize> = p
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == 1)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(small.len(), 100);
        for w in small.windows(2) {
            assert_eq!(w[1] - w[0], 12);
        }
    }

    #[test]
    fn zero_weight_is_never_picked_and_none_when_all_zero() {
        let p = picks(&[0, 3, 0, 1], 400);
        assert!(p.iter().all(|&i| i == 1 || i == 3));
        assert_eq!(p.iter().filter(|&&i| i == 1).count(), 300);
        let mut s = SmoothWrr::new(2);
        assert_eq!(s.pick(|_| 0), None);
        assert_eq!(SmoothWrr::new(0).pick(|_| 1), None);
    }

    #[test]
    fn ineligible_back_end_is_skipped_and_resumes() {
        let mut s = SmoothWrr::new(2);
        let mut full = true;
        let mut got = Vec::new();
        for k in 0..20 {
            if k == 10 {
                full = false;
            }
            got.push(s.pick(|i| if i == 0 && full { 0 } else { 1 }).expect("b"));
        }
        assert!(got[..10].iter().all(|&i| i == 1));
        assert!(got[10..].contains(&0));
    }

    proptest! {
        /// Every window of Σw consecutive picks gives each back end exactly its weight.
        #[test]
        fn every_window_is_exact(weights in proptest::collection::vec(0u32..20, 1..12), start in 0usize..50) {
            let total: u32 = weights.iter().sum();
            prop_assume!(total > 0);
            let w = total as usize;
            let p = picks(&weights, start + 2 * w);
            for window in [&p[start..start + w], &p[start + w..start + 2 * w]] {
                for (i, &wi) in weights.iter().enumerate() {
                    prop_assert_eq!(window.iter().filter(|&&b| b == i).count(), wi as usize);
                }
            }
        }

        /// Picks are spread: back end i never gets more than ceil(w_i * k / W) + 1 of any
        /// k consecutive picks (no bursts).
        #[test]
        fn no_bursts(weights in proptest::collection::vec(1u32..10, 2..8)) {
            let total: u32 = weights.iter().sum();
            let p = picks(&weights, 3 * total as usize);
            for k in 1..=total as usize {
                for window in p.windows(k) {
                    for (i, &wi) in weights.iter().enumerate() {
                        let got = window.iter().filter(|&&b| b == i).count();
                        let bound = (wi as usize * k).div_ceil(total as usize) + 1;
                        prop_assert!(got <= bound, "backend {i} got {got} of {k} (bound {bound})");
                    }
                }
            }
        }

        /// The state stays bounded (no overflow over long runs).
        #[test]
        fn current_stays_bounded(weights in proptest::collection::vec(0u32..1000, 1..20)) {
            let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
            prop_assume!(total > 0);
            let mut s = SmoothWrr::new(weights.len());
            for _ in 0..5000 {
                s.pick(|i| weights[i]);
                let n = weights.len() as i64;
                prop_assert!(s.current.iter().all(|c| c.abs() < n * total));
                prop_assert_eq!(s.current.iter().sum::<i64>(), 0);
            }
        }
    }
}
