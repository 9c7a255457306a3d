//! Whole-vocabulary passes over the logits, four values at a time: 128-bit SIMD in the
//! component, plain arrays elsewhere (the tests), the same arithmetic in both.
//!
//! A token's sampling reads every logit once or twice: 49k–152k values. As scalar wasm with
//! `f32::max` (a call to `fmaxf`: wasm's `f32.max` treats NaN otherwise) and libm's `expf`
//! (one call per value), that took ~0.4 ms per token, about 15% of a small model's decode
//! step, and four streams' guests kept each batched pass waiting for it. The compiler does
//! not vectorize these loops by itself (a float sum must keep its order; `exp` is a call), so
//! they are written over [`F32x4`], whose every operation is one wasm SIMD instruction.

pub use vector::F32x4;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod vector {
    use core::arch::wasm32::*;

    /// Four f32 lanes.
    #[derive(Clone, Copy)]
    pub struct F32x4(v128);

    impl F32x4 {
        #[inline(always)]
        pub fn splat(x: f32) -> Self {
            Self(f32x4_splat(x))
        }
        #[inline(always)]
        pub fn load(c: &[f32; 4]) -> Self {
            Self(f32x4(c[0], c[1], c[2], c[3]))
        }
        #[inline(always)]
        pub fn lanes(self) -> [f32; 4] {
            [
                f32x4_extract_lane::<0>(self.0),
                f32x4_extract_lane::<1>(self.0),
                f32x4_extract_lane::<2>(self.0),
                f32x4_extract_lane::<3>(self.0),
            ]
        }
        #[inline(always)]
        pub fn add(self, o: Self) -> Self {
            Self(f32x4_add(self.0, o.0))
        }
        #[inline(always)]
        pub fn sub(self, o: Self) -> Self {
            Self(f32x4_sub(self.0, o.0))
        }
        #[inline(always)]
        pub fn mul(self, o: Self) -> Self {
            Self(f32x4_mul(self.0, o.0))
        }
        #[inline(always)]
        pub fn div(self, o: Self) -> Self {
            Self(f32x4_div(self.0, o.0))
        }
        #[inline(always)]
        pub fn floor(self) -> Self {
            Self(f32x4_floor(self.0))
        }
        #[inline(always)]
        pub fn abs(self) -> Self {
            Self(f32x4_abs(self.0))
        }
        /// Per lane, `o` where `o > self`, else `self` (so a NaN `o` never wins).
        #[inline(always)]
        pub fn larger(self, o: Self) -> Self {
            Self(f32x4_pmax(self.0, o.0))
        }
        /// Per lane, `a` where `self < limit`, else `b` (also where either is NaN).
        #[inline(always)]
        pub fn below(self, limit: Self, a: Self, b: Self) -> Self {
            Self(v128_bitselect(a.0, b.0, f32x4_lt(self.0, limit.0)))
        }
        /// Whether any lane equals `o`'s.
        #[inline(always)]
        pub fn any_eq(self, o: Self) -> bool {
            v128_any_true(f32x4_eq(self.0, o.0))
        }
        /// `2^n` for lanes holding integers n in [−126, 128], built from the bits of
        /// `n + 1.5·2^23` (whose low mantissa bits hold n): no float-to-int conversion.
        #[inline(always)]
        pub fn pow2(self) -> Self {
            let shifted = f32x4_add(self.0, f32x4_splat(super::MAGIC));
            let n = i32x4_sub(shifted, u32x4_splat(super::MAGIC.to_bits()));
            Self(i32x4_shl(i32x4_add(n, i32x4_splat(127)), 23))
        }
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
mod vector {
    /// Four f32 lanes.
    #[derive(Clone, Copy)]
    pub struct F32x4([f32; 4]);

    impl F32x4 {
        #[inline(always)]
        fn map(self, f: impl Fn(f32) -> f32) -> Self {
            Self(self.0.map(f))
        }
        #[inline(always)]
        fn zip(self, o: Self, f: impl Fn(f32, f32) -> f32) -> Self {
            Self(std::array::from_fn(|i| f(self.0[i], o.0[i])))
        }
        #[inline(always)]
        pub fn splat(x: f32) -> Self {
            Self([x; 4])
        }
        #[inline(always)]
        pub fn load(c: &[f32; 4]) -> Self {
            Self(*c)
        }
        #[inline(always)]
        pub fn lanes(self) -> [f32; 4] {
            self.0
        }
        #[inline(always)]
        pub fn add(self, o: Self) -> Self {
            self.zip(o, |a, b| a + b)
        }
        #[inline(always)]
        pub fn sub(self, o: Self) -> Self {
            self.zip(o, |a, b| a - b)
        }
        #[inline(always)]
        pub fn mul(self, o: Self) -> Self {
            self.zip(o, |a, b| a * b)
        }
        #[inline(always)]
        pub fn div(self, o: Self) -> Self {
            self.zip(o, |a, b| a / b)
        }
        #[inline(always)]
        pub fn floor(self) -> Self {
            self.map(f32::floor)
        }
        #[inline(always)]
        pub fn abs(self) -> Self {
            self.map(f32::abs)
        }
        /// Per lane, `o` where `o > self`, else `self` (so a NaN `o` never wins).
        #[inline(always)]
        pub fn larger(self, o: Self) -> Self {
            self.zip(o, |a, b| if a < b { b } else { a })
        }
        /// Per lane, `a` where `self < limit`, else `b` (also where either is NaN).
        #[inline(always)]
        pub fn below(self, limit: Self, a: Self, b: Self) -> Self {
            Self(std::array::from_fn(|i| {
                if self.0[i] < limit.0[i] {
                    a.0[i]
                } else {
                    b.0[i]
                }
            }))
        }
        /// Whether any lane equals `o`'s.
        #[inline(always)]
        pub fn any_eq(self, o: Self) -> bool {
            self.0.iter().zip(o.0).any(|(a, b)| *a == b)
        }
        /// `2^n` for lanes holding integers n in [−126, 128], built from the bits of
        /// `n + 1.5·2^23` (whose low mantissa bits hold n): no float-to-int conversion.
        #[inline(always)]
        pub fn pow2(self) -> Self {
            self.map(|n| {
                let n = (n + super::MAGIC)
                    .to_bits()
                    .wrapping_sub(super::MAGIC.to_bits());
                f32::from_bits(n.wrapping_add(127) << 23)
            })
        }
    }
}

/// 1.5·2^23: adding it to a small integer-valued float leaves the integer in the low
/// mantissa bits.
const MAGIC: f32 = 12_582_912.0;

impl F32x4 {
    /// `e^x` per lane, within 2 ulp of the true value for x ≤ 88 (here x ≤ 0); exactly 0
    /// below −87.3 (where `e^x` is no longer a normal f32), so −∞ gives 0; NaN stays NaN.
    /// Cephes' `expf`: `x = n·ln 2 + r` with |r| ≤ ln 2 / 2, a polynomial for `e^r`, `2^n`
    /// from its bits.
    #[inline(always)]
    pub fn exp(self) -> Self {
        let s = Self::splat;
        // ln 2 in two parts, so that n · LN2_HI is exact.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // NaN takes the bound here and stays NaN through `r`.
        let bounded = self.below(s(88.37), self, s(88.37));
        let n = bounded.mul(s(std::f32::consts::LOG2_E)).add(s(0.5)).floor();
        let r = self.sub(n.mul(s(LN2_HI))).sub(n.mul(s(LN2_LO)));
        let mut p = s(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = p.mul(r).add(s(c));
        }
        let y = p.mul(r).mul(r).add(r).add(s(1.0));
        self.below(s(-87.3), s(0.0), y.mul(n.pow2()))
    }

    /// Non-finite lanes as −∞.
    #[inline(always)]
    fn finite_or_neg_inf(self) -> Self {
        self.abs().below(
            Self::splat(f32::INFINITY),
            self,
            Self::splat(f32::NEG_INFINITY),
        )
    }
}

/// `e^x` ([`F32x4::exp`] on one value, so every path here computes the same numbers).
pub fn exp(x: f32) -> f32 {
    F32x4::splat(x).exp().lanes()[0]
}

/// `x` in groups of four, the last padded with `pad`.
fn quads(x: &[f32], pad: f32) -> impl Iterator<Item = F32x4> + '_ {
    let (chunks, tail) = x.as_chunks::<4>();
    let last = (!tail.is_empty()).then(|| {
        let mut q = [pad; 4];
        q[..tail.len()].copy_from_slice(tail);
        F32x4::load(&q)
    });
    chunks.iter().map(F32x4::load).chain(last)
}

/// The largest of four lanes, by the same rule as [`F32x4::larger`].
fn largest(v: F32x4) -> f32 {
    v.lanes()
        .into_iter()
        .fold(f32::NEG_INFINITY, |m, x| if m < x { x } else { m })
}

/// The largest value that is not NaN; −∞ when there is none.
pub fn max(x: &[f32]) -> f32 {
    largest(quads(x, f32::NEG_INFINITY).fold(F32x4::splat(f32::NEG_INFINITY), F32x4::larger))
}

/// The largest finite value; −∞ when there is none.
pub fn max_finite(x: &[f32]) -> f32 {
    largest(
        quads(x, f32::NEG_INFINITY).fold(F32x4::splat(f32::NEG_INFINITY), |m, v| {
            m.larger(v.finite_or_neg_inf())
        }),
    )
}

/// The index of the first largest value, NaN ignored; 0 when every value is NaN.
pub fn argmax(x: &[f32]) -> u32 {
    let m = max(x);
    let target = F32x4::splat(m);
    // The first group of four that holds the maximum, then the place in it.
    let group = quads(x, f32::NAN).position(|q| q.any_eq(target));
    group
        .and_then(|g| x[4 * g..].iter().position(|&v| v == m).map(|i| 4 * g + i))
        .unwrap_or(0) as u32
}

/// `Σ e^(x_i − shift)` over all `x_i` (NaN when a term is).
pub fn exp_sum(x: &[f32], shift: f32) -> f32 {
    let shift = F32x4::splat(shift);
    let sum = quads(x, f32::NEG_INFINITY).fold(F32x4::splat(0.0), |s, q| s.add(q.sub(shift).exp()));
    sum.lanes().iter().sum()
}

/// `Σ e^((x_i − shift) / t)` over the finite `x_i`, each term stored in `terms` (0 for the
/// others), which is cleared first. The sum adds the terms four at a time as
/// `(e0 + e1) + (e2 + e3)`, group after group: the order [`pick`] walks them in, so a target
/// below the sum always falls on a term.
pub fn exp_terms(x: &[f32], shift: f32, t: f32, terms: &mut Vec<f32>) -> f32 {
    let (shift, t) = (F32x4::splat(shift), F32x4::splat(t));
    terms.clear();
    terms.reserve(x.len() + 4);
    let mut sum = 0.0;
    for q in quads(x, f32::NEG_INFINITY) {
        // −∞ makes a 0 term.
        let e = q.finite_or_neg_inf().sub(shift).div(t).exp().lanes();
        sum += group_sum(&e);
        terms.extend(e);
    }
    terms.truncate(x.len());
    sum
}

/// Four terms added as [`exp_terms`] adds them.
#[inline(always)]
fn group_sum(e: &[f32; 4]) -> f32 {
    (e[0] + e[1]) + (e[2] + e[3])
}

/// The first index at which the running sum of `terms` (added as [`exp_terms`] adds them)
/// passes `target`; within the group of four where it does, the last positive term if
/// rounding there keeps it short. `None` when the whole sum does not pass `target`.
pub fn pick(terms: &[f32], target: f32) -> Option<usize> {
    let mut cum = 0.0;
    let (groups, tail) = terms.as_chunks::<4>();
    let mut last = [0.0; 4];
    last[..tail.len()].copy_from_slice(tail);
    let all = groups.iter().chain((!tail.is_empty()).then_some(&last));
    for (g, e) in all.enumerate() {
        let next = cum + group_sum(e);
        if target < next {
            let (mut c, mut at) = (cum, None);
            for (i, &w) in e.iter().enumerate().filter(|(_, w)| **w > 0.0) {
                c += w;
                at = Some(4 * g + i);
                if target < c {
                    break;
                }
            }
            return at;
        }
        cum = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across the whole range `exp` takes, with the edges.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..200_000).map(|i| -100.0 + i as f32 * 0.000_94).collect();
        v.extend([
            0.0, -0.0, 1e-30, -1e-30, -87.2, -87.3, -87.4, 88.0, 88.3, 0.5, -0.5,
        ]);
        v.extend((0..1000).map(|i| (i as f32 * 0.618).sin() * 20.0));
        v
    }

    #[test]
    fn exp_is_within_two_ulp_where_it_is_normal() {
        for x in inputs() {
            let want = f64::from(x).exp();
            let got = exp(x);
            if x < -87.3 {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                let ulp = f64::from(f32::from_bits((want as f32).to_bits() + 1)) - want;
                let err = ((f64::from(got) - want) / ulp.abs()).abs();
                assert!(err <= 2.0, "exp({x}) = {got}, want {want} ({err} ulp)");
            }
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    fn logits(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) % 2000) as f32 / 100.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn reductions_match_a_plain_loop_at_every_length_and_position() {
        for n in [1, 2, 3, 4, 5, 7, 8, 9, 100, 1001] {
            for seed in 0..4 {
                let mut x = logits(n, seed);
                if seed == 1 {
                    x[n / 2] = f32::NAN;
                }
                if seed == 2 {
                    x[n - 1] = f32::INFINITY;
                    x[0] = f32::NEG_INFINITY;
                }
                let plain_max = x
                    .iter()
                    .copied()
                    .filter(|v| !v.is_nan())
                    .fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(&x), plain_max, "max n={n} seed={seed}");
                let finite = x
                    .iter()
                    .copied()
                    .filter(|v| v.is_finite())
                    .fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max_finite(&x), finite, "max_finite n={n} seed={seed}");
                let first = x.iter().position(|&v| v == plain_max).unwrap_or(0) as u32;
                assert_eq!(argmax(&x), first, "argmax n={n} seed={seed}");
                // Ties: the first of several equal maxima, wherever they fall in a group.
                for at in [0, n / 3, n - 1] {
                    let mut t: Vec<f32> = x.iter().map(|v| v.min(5.0)).collect();
                    t[at] = 7.0;
                    for later in [at + 1, at + 9] {
                        if later < n {
                            t[later] = 7.0;
                        }
                    }
                    assert_eq!(argmax(&t), at as u32, "tie n={n} at={at}");
                }
                if seed == 0 || seed == 3 {
                    let want: f64 = x.iter().map(|&v| f64::from(v - 2.0).exp()).sum();
                    let got = f64::from(exp_sum(&x, 2.0));
                    assert!(
                        (got - want).abs() <= want * 1e-5,
                        "exp_sum n={n} {got} {want}"
                    );
                }
                let mut terms = vec![9.0; 3];
                let s = exp_terms(&x, 3.0, 0.7, &mut terms);
                assert_eq!(terms.len(), n);
                let want: f64 = x
                    .iter()
                    .filter(|v| v.is_finite())
                    .map(|&v| (f64::from(v - 3.0) / 0.7).exp())
                    .sum();
                assert!(
                    (f64::from(s) - want).abs() <= want * 1e-5,
                    "exp_terms n={n}"
                );
                for (t, v) in terms.iter().zip(&x) {
                    assert_eq!(*t == 0.0, !v.is_finite() || (v - 3.0) / 0.7 < -87.3);
                    if v.is_finite() {
                        assert_eq!(*t, exp((v - 3.0) / 0.7));
                    }
                }
            }
        }
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN; 11]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 11]), 0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod pick_tests {
    use super::*;

    #[test]
    fn every_target_below_the_sum_falls_on_a_positive_term() {
        // Many small terms after a large one: a sum in another order than the walk's would
        // leave targets near the top with no term (the draw then took the vocabulary's last).
        let mut x = vec![0.0f32];
        x.extend((0..49_151).map(|i| -8.0 - (i % 13) as f32));
        x[20_000] = f32::NEG_INFINITY;
        let mut terms = Vec::new();
        let sum = exp_terms(&x, 0.0, 1.0, &mut terms);
        for k in 0..=4096u32 {
            let r = if k == 4096 {
                1.0 - f32::EPSILON / 2.0
            } else {
                k as f32 / 4096.0
            };
            let target = r * sum;
            let i = pick(&terms, target);
            if target < sum {
                let i = i.unwrap_or_else(|| panic!("no term for {r}"));
                assert!(terms[i] > 0.0);
                // The right term, up to what f32 running sums can lose (n · ε of the sum).
                let before: f64 = terms[..i].iter().map(|&w| f64::from(w)).sum();
                let slack = terms.len() as f64 * f64::from(f32::EPSILON) * f64::from(sum);
                let target = f64::from(target);
                assert!(before <= target + slack, "{r}: {i}");
                assert!(before + f64::from(terms[i]) >= target - slack, "{r}: {i}");
            }
        }
        assert_eq!(pick(&terms, 0.0), Some(0));
        assert_eq!(pick(&terms, sum), None);
        // Tails of every length.
        for n in 1..9 {
            let sum = exp_terms(&vec![0.0; n], 0.0, 1.0, &mut terms);
            assert_eq!(sum, n as f32);
            assert_eq!(pick(&terms, sum - 0.5), Some(n - 1));
            assert_eq!(pick(&terms, 0.5), Some(0));
            assert_eq!(pick(&terms, sum), None);
        }
    }
}
