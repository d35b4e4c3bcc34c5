//! Stops a run whose loss or gradient norm is no longer finite, with a message that says what
//! to change.

use crate::config::Dtype;
use crate::error::TrainError;

/// A short form of a number for messages: `2e-4`, `1.5`, `NaN`, `inf`.
pub fn short(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e6) {
        let s = format!("{x:.3e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        format!("{mantissa}e{exp}")
    } else {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// `Ok` when `loss` and `grad_norm` are finite; otherwise [`TrainError::NonFinite`] naming the
/// step, the values, the learning rate and the dtype, and what to change.
pub fn check_finite(
    step: u64,
    loss: f64,
    grad_norm: f64,
    lr: f64,
    dtype: Dtype,
) -> Result<(), TrainError> {
    let what = if !loss.is_finite() {
        "loss"
    } else if !grad_norm.is_finite() {
        "gradient norm"
    } else {
        return Ok(());
    };
    Err(TrainError::NonFinite {
        step,
        what,
        loss,
        grad_norm,
        lr,
        dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_values_pass() {
        assert!(check_finite(3, 2.5, 0.7, 2e-4, Dtype::F32).is_ok());
    }

    #[test]
    fn nan_loss_gives_an_actionable_message() {
        let e = check_finite(12, f64::NAN, f64::INFINITY, 2e-4, Dtype::F32).unwrap_err();
        assert_eq!(
            e.to_string(),
            "step 12: loss is NaN (grad norm inf, lr 2e-4, dtype f32): lower train.lr, check \
             the data for empty or extreme rows, or clip gradients harder with a lower \
             train.max_grad_norm (0 turns clipping off)"
        );
    }

    #[test]
    fn infinite_gradient_norm_is_caught_too() {
        let e = check_finite(7, 3.25, f64::INFINITY, 1.5e-5, Dtype::Bf16).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("step 7: gradient norm is inf (loss 3.25, lr 1.5e-5, dtype bf16):"));
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(2e-4), "2e-4");
        assert_eq!(short(1.234_567e-5), "1.235e-5");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(3.0), "3");
        assert_eq!(short(f64::NEG_INFINITY), "-inf");
    }
}
