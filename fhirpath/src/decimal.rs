//! Exact decimal numbers with their written precision (`1.10` keeps two decimal places), as
//! FHIR and FHIRPath decimals require; binary floating point is only used for the
//! transcendental functions.

use std::cmp::Ordering;
use std::fmt;

/// Most decimal places kept; results beyond it are rounded.
const MAX_SCALE: u32 = 28;
/// Decimal places of a quotient, at least (FHIRPath leaves it to the implementation).
const DIVISION_SCALE: u32 = 8;

/// A decimal value `mantissa / 10^scale`.
#[derive(Debug, Clone, Copy)]
pub struct Decimal {
    mantissa: i128,
    scale: u32,
}

fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

/// `n / d` rounded half away from zero.
fn div_round(n: i128, d: i128) -> Option<i128> {
    let q = n.checked_div(d)?;
    let r = n.checked_rem(d)?;
    if r.checked_abs()?.checked_mul(2)? >= d.checked_abs()? {
        if (n < 0) != (d < 0) {
            q.checked_sub(1)
        } else {
            q.checked_add(1)
        }
    } else {
        Some(q)
    }
}

impl Decimal {
    /// The integer `i` (scale 0).
    pub fn from_i64(i: i64) -> Decimal {
        Decimal {
            mantissa: i128::from(i),
            scale: 0,
        }
    }

    /// Parses decimal text (`-1.50`, `2e-3`); `None` if invalid or out of range.
    pub fn parse(text: &str) -> Option<Decimal> {
        let (number, exponent) = match text.find(['e', 'E']) {
            Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
            None => (text, 0),
        };
        let (negative, digits) = match number.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, number.strip_prefix('+').unwrap_or(number)),
        };
        let (int, frac) = match digits.split_once('.') {
            Some((_, "")) => return None,
            Some(parts) => parts,
            None => (digits, ""),
        };
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut mantissa: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa
                .checked_mul(10)?
                .checked_add(i128::from(b - b'0'))?;
        }
        let mut scale = i64::try_from(frac.len()).ok()? - i64::from(exponent);
        if scale < 0 {
            mantissa = mantissa.checked_mul(pow10(u32::try_from(-scale).ok()?)?)?;
            scale = 0;
        }
        let mut d = Decimal {
            mantissa: if negative { -mantissa } else { mantissa },
            scale: u32::try_from(scale).ok()?,
        };
        if d.scale > MAX_SCALE {
            d = d.round(MAX_SCALE)?;
        }
        Some(d)
    }

    /// The nearest decimal to a float (shortest round-trip digits); `None` for non-finite or
    /// out-of-range values.
    pub(crate) fn from_f64(f: f64) -> Option<Decimal> {
        if !f.is_finite() {
            return None;
        }
        Decimal::parse(&format!("{f}"))
    }

    /// The value as a float (may lose precision).
    pub fn to_f64(&self) -> f64 {
        self.mantissa as f64 / 10f64.powi(self.scale as i32)
    }

    /// Number of decimal places as written.
    pub fn scale(&self) -> u32 {
        self.scale
    }

    fn with_scale(self, scale: u32) -> Option<Decimal> {
        if scale >= self.scale {
            Some(Decimal {
                mantissa: self.mantissa.checked_mul(pow10(scale - self.scale)?)?,
                scale,
            })
        } else {
            self.round(scale)
        }
    }

    fn aligned(self, other: Decimal) -> Option<(i128, i128, u32)> {
        let scale = self.scale.max(other.scale);
        Some((
            self.with_scale(scale)?.mantissa,
            other.with_scale(scale)?.mantissa,
            scale,
        ))
    }

    /// Rounds half away from zero to `places` decimal places.
    pub(crate) fn round(self, places: u32) -> Option<Decimal> {
        if places >= self.scale {
            return self.with_scale(places);
        }
        Some(Decimal {
            mantissa: div_round(self.mantissa, pow10(self.scale - places)?)?,
            scale: places,
        })
    }

    pub(crate) fn checked_add(self, other: Decimal) -> Option<Decimal> {
        let (a, b, scale) = self.aligned(other)?;
        Some(Decimal {
            mantissa: a.checked_add(b)?,
            scale,
        })
    }

    pub(crate) fn checked_sub(self, other: Decimal) -> Option<Decimal> {
        self.checked_add(other.neg()?)
    }

    pub(crate) fn checked_mul(self, other: Decimal) -> Option<Decimal> {
        let d = Decimal {
            mantissa: self.mantissa.checked_mul(other.mantissa)?,
            scale: self.scale + other.scale,
        };
        if d.scale > MAX_SCALE {
            d.round(MAX_SCALE)
        } else {
            Some(d)
        }
    }

    /// Quotient with at least [`DIVISION_SCALE`] places; `None` on division by zero.
    pub(crate) fn checked_div(self, other: Decimal) -> Option<Decimal> {
        if other.mantissa == 0 {
            return None;
        }
        let scale = DIVISION_SCALE.max(self.scale).max(other.scale);
        // n / d = (a / 10^sa) / (b / 10^sb); scaled by 10^scale: a * 10^(scale + sb - sa) / b.
        let shift = scale + other.scale - self.scale;
        let exact = self
            .mantissa
            .checked_mul(pow10(shift)?)
            .and_then(|n| div_round(n, other.mantissa))
            .map(|mantissa| Decimal { mantissa, scale });
        exact.or_else(|| Decimal::from_f64(self.to_f64() / other.to_f64()))
    }

    /// Truncated integer quotient.
    pub(crate) fn div_trunc(self, other: Decimal) -> Option<i128> {
        let (a, b, _) = self.aligned(other)?;
        a.checked_div(b)
    }

    pub(crate) fn checked_rem(self, other: Decimal) -> Option<Decimal> {
        let (a, b, scale) = self.aligned(other)?;
        Some(Decimal {
            mantissa: a.checked_rem(b)?,
            scale,
        })
    }

    pub(crate) fn neg(self) -> Option<Decimal> {
        Some(Decimal {
            mantissa: self.mantissa.checked_neg()?,
            scale: self.scale,
        })
    }

    pub(crate) fn abs(self) -> Option<Decimal> {
        Some(Decimal {
            mantissa: self.mantissa.checked_abs()?,
            scale: self.scale,
        })
    }

    /// The integer part, rounded toward negative infinity (`floor`), positive infinity
    /// (`ceiling`) or zero.
    pub(crate) fn to_integer(self, mode: Ordering) -> Option<i64> {
        let unit = pow10(self.scale)?;
        let q = self.mantissa / unit;
        let r = self.mantissa % unit;
        let v = match mode {
            Ordering::Less if r < 0 => q - 1,
            Ordering::Greater if r > 0 => q + 1,
            _ => q,
        };
        i64::try_from(v).ok()
    }

    pub(crate) fn is_zero(&self) -> bool {
        self.mantissa == 0
    }

    /// Numeric order, ignoring precision (`1.0` equals `1`).
    pub(crate) fn cmp_value(&self, other: &Decimal) -> Ordering {
        match self.aligned(*other) {
            Some((a, b, _)) => a.cmp(&b),
            None => self
                .to_f64()
                .partial_cmp(&other.to_f64())
                .unwrap_or(Ordering::Equal),
        }
    }

    /// Equal when rounded to the lesser precision of the two (FHIRPath `~`).
    pub(crate) fn equivalent(&self, other: &Decimal) -> bool {
        let places = self.scale.min(other.scale);
        match (self.round(places), other.round(places)) {
            (Some(a), Some(b)) => a.mantissa == b.mantissa,
            _ => false,
        }
    }

    /// The bounds of the interval this value stands for, at `places` decimal places:
    /// `low` is the smallest value that rounds to it, the high bound the largest.
    pub(crate) fn boundary(self, places: u32, high: bool) -> Option<Decimal> {
        // Half a unit in the last written place.
        let half = Decimal {
            mantissa: if high { 5 } else { -5 },
            scale: self.scale + 1,
        };
        let edge = self.checked_add(half)?;
        if places >= edge.scale {
            return edge.with_scale(places);
        }
        // Fewer places than the bound has: a bound moving away from zero is rounded, one
        // moving toward zero is truncated (the behaviour the FHIRPath test suite specifies).
        let unit = pow10(edge.scale - places)?;
        let away = high == (edge.mantissa >= 0);
        let mantissa = if away {
            div_round(edge.mantissa, unit)?
        } else {
            edge.mantissa / unit
        };
        Some(Decimal {
            mantissa,
            scale: places,
        })
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        if self.mantissa < 0 {
            f.write_str("-")?;
        }
        if scale == 0 {
            return f.write_str(&digits);
        }
        let padded = if digits.len() <= scale {
            format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
        } else {
            digits
        };
        let (int, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{int}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap()
    }

    #[test]
    fn keeps_written_precision() {
        for s in [
            "1.0",
            "0.0",
            "-1.50",
            "123",
            "0.00000001",
            "1234567890987654321.0",
        ] {
            assert_eq!(d(s).to_string(), s);
        }
        assert_eq!(d("2e-3").to_string(), "0.002");
        assert_eq!(d("1.5E2").to_string(), "150");
        for bad in ["", "-", ".5", "1.", "1.2.3", "abc", "1e", "1e99999999999"] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn arithmetic_is_exact() {
        assert_eq!(d("1.8").checked_sub(d("1.2")).unwrap().to_string(), "0.6");
        assert_eq!(d("2.2").checked_rem(d("1.8")).unwrap().to_string(), "0.4");
        assert_eq!(d("0.1").checked_mul(d("0.2")).unwrap().to_string(), "0.02");
        assert_eq!(
            d("1").checked_div(d("3")).unwrap().to_string(),
            "0.33333333"
        );
        assert_eq!(
            d("1.2")
                .checked_div(d("1.8"))
                .unwrap()
                .round(2)
                .unwrap()
                .to_string(),
            "0.67"
        );
        assert!(d("1").checked_div(d("0.0")).is_none());
        assert!(d("1.10").cmp_value(&d("1.1")).is_eq());
        assert!(d("1.1").equivalent(&d("1.14")));
        assert!(!d("1.1").equivalent(&d("1.16")));
        let big = Decimal::from_i64(i64::MAX);
        assert!(big.checked_mul(big).unwrap().checked_mul(big).is_none());
    }

    #[test]
    fn rounding_and_integer_parts() {
        assert_eq!(d("2.5").round(0).unwrap().to_string(), "3");
        assert_eq!(d("-2.5").round(0).unwrap().to_string(), "-3");
        assert_eq!(d("-2.5").to_integer(Ordering::Less), Some(-3));
        assert_eq!(d("-2.5").to_integer(Ordering::Greater), Some(-2));
        assert_eq!(d("-2.5").to_integer(Ordering::Equal), Some(-2));
        assert_eq!(
            d("1.587").boundary(8, false).unwrap().to_string(),
            "1.58650000"
        );
        assert_eq!(d("1.587").boundary(2, true).unwrap().to_string(), "1.59");
        assert_eq!(d("-1.587").boundary(0, false).unwrap().to_string(), "-2");
    }
}
