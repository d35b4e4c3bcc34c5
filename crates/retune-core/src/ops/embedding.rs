//! Token embedding lookup: `out[i] = table[ids[i]]`.

use super::stored::StoredMatrix;
use crate::Float;
use rayon::prelude::*;

/// Rows per rayon task: a lookup is a memcpy, so tasks must be large to pay off.
const ROWS_PER_TASK: usize = 64;

/// `out[N, C] = table[ids[i], :]` for each of the N tokens; `table` is `[V, C]`.
///
/// Panics if an id is outside the table (ids are validated against the vocabulary upstream).
pub fn embedding_forward<T: Float>(out: &mut [T], ids: &[u32], table: &[T], c: usize) {
    let v = table.len().checked_div(c).unwrap_or(0);
    lookup(out, ids, v, c, |id, row| {
        row.copy_from_slice(&table[id * c..(id + 1) * c])
    });
}

/// Fills row `i` of `out[N, C]` with `row_of(ids[i], row)`, rows in parallel, checking each
/// id against the `v` rows of the table.
fn lookup<T: Send>(
    out: &mut [T],
    ids: &[u32],
    v: usize,
    c: usize,
    row_of: impl Fn(usize, &mut [T]) + Sync,
) {
    assert_eq!(
        out.len(),
        ids.len() * c,
        "embedding_forward: out must be [N, C]"
    );
    out.par_chunks_mut(c.max(1))
        .zip(ids)
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(row, &id)| {
            let id = id as usize;
            assert!(
                id < v,
                "embedding_forward: token id {id} outside vocabulary of {v}"
            );
            row_of(id, row);
        });
}

/// [`embedding_forward`] from a table held in its storage type: each row dequantised.
pub fn embedding_forward_stored(out: &mut [f32], ids: &[u32], table: &StoredMatrix) {
    let (v, c) = (table.rows(), table.cols());
    lookup(out, ids, v, c, |id, row| table.dequantize_row(id, row));
}

/// `dtable[ids[i], :] += dout[i, :]`; `dtable` is `[V, C]`, `dout` is `[N, C]`.
///
/// Serial: repeated ids would race, and the pass is a cheap N x C add next to the matmuls.
pub fn embedding_backward<T: Float>(dtable: &mut [T], dout: &[T], ids: &[u32], c: usize) {
    assert_eq!(
        dout.len(),
        ids.len() * c,
        "embedding_backward: dout must be [N, C]"
    );
    let v = dtable.len().checked_div(c).unwrap_or(0);
    for (grow, &id) in dout.chunks_exact(c.max(1)).zip(ids) {
        let id = id as usize;
        assert!(
            id < v,
            "embedding_backward: token id {id} outside vocabulary of {v}"
        );
        for (d, &g) in dtable[id * c..(id + 1) * c].iter_mut().zip(grow) {
            *d += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, rand_ids, randv, to_f32};

    const V: usize = 7;
    const C: usize = 5;
    const N: usize = 9;

    fn forward(table: &[f64], ids: &[u32]) -> Vec<f64> {
        let mut out = vec![0.0; ids.len() * C];
        embedding_forward(&mut out, ids, table, C);
        out
    }

    #[test]
    fn embedding_lookup_and_f32() {
        let (table, ids) = (randv(V * C, 1), rand_ids(N, V as u32, 2));
        let out = forward(&table, &ids);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(
                out[i * C..(i + 1) * C],
                table[id as usize * C..(id as usize + 1) * C]
            );
        }
        let mut out32 = vec![0.0f32; N * C];
        embedding_forward(&mut out32, &ids, &to_f32(&table), C);
        assert!(max_rel_diff(&out32, &out) < 1e-5);
    }

    /// Repeated ids must sum their gradients; rows never looked up get none.
    #[test]
    fn embedding_gradcheck() {
        let (table, r) = (randv(V * C, 3), randv(N * C, 4));
        let ids = [3, 1, 3, 0, 6, 3, 1, 0, 0];
        let mut dtable = vec![0.0; V * C];
        embedding_backward(&mut dtable, &r, &ids, C);
        let err = check_grad_out("embedding dtable", &table, &dtable, &r, |t| {
            forward(t, &ids)
        });
        assert!(err < 1e-6);
        // Accumulates: a second call doubles the gradient.
        let once = dtable.clone();
        embedding_backward(&mut dtable, &r, &ids, C);
        assert!(dtable
            .iter()
            .zip(&once)
            .all(|(d, o)| (d - 2.0 * o).abs() < 1e-15));
    }
}
