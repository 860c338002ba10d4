"""One SAE trained by W torch.distributed ranks: the same result as one process.

`train_sae(..., collective=Ranks())` on every rank of an initialised process
group (gloo on CPU, NCCL on GPU) runs the single-process loop with these
differences, all inside `monoray.sae.collective.Ranks`:

- each global batch is the one a single process draws (same seed, same
  permutation), sorted, and cut into W contiguous slices (rank 0 first;
  `torch.tensor_split`, so a final short batch gives unequal slices);
- every rank's loss is its additive share of the single-process loss (means
  divide by the global element count; MonoLoss is `mono_loss_global`, whose
  value each rank carries 1/W of), so summing the gradients over ranks gives
  the single-process gradient; decoder projection, clipping, Adam and the
  renormalisation then run on identical numbers on every rank;
- BatchTopK / Matryoshka keep the k·B largest activations of the global
  batch (all-gather of each rank's top k·B candidates, one global cut, ties
  to the lower global position, as the single-process selection does); the
  inference threshold's EMA sees the global smallest kept value;
- AuxK's "fired" mask is OR-reduced, so dead-latent counters agree on every
  rank; TopK re-initialisation picks the global batch's worst rows;
- evaluation shards the val split and merges every accumulator.

Exactness is up to float32 rounding: sums of W partial sums are added in a
different order than one sum over the batch (relative differences ~1e-7 per
step, which Adam can amplify over many steps). MonoLoss runs in float64 at
W > 1 (`mono_loss_global`), so at `mono_precision: float32` W = 1 and W > 1
differ by that precision's ~1e-5.

Bytes per step (float32 unless noted): BatchTopK W·k·B values all-gathered;
the gradients (all parameters) all-reduced once; MonoLoss as documented in
`monoray.metrics.distributed_loss`; a [d_sae] fired mask; W row counts.

Cost: `mono_loss_global` takes dense activations, so at W > 1 MonoLoss is a
float64 [d_sae, B_r] x [B_r, d] product per rank instead of the sparse
O(nnz·d) kernel one process uses: at the paper size on CPU that step is ~10x
slower than one process (`bench/sae_distributed.py`; README). Without
MonoLoss the split pays (1.4x at W = 2 on 2 vCPUs).

A last partial batch must give every rank a row (`check_shards`): the loss
kernels are not defined on empty slices.
"""

from __future__ import annotations

from monoray.errors import InputError


def check_shards(n_train: int, batch_size: int, workers: int, *, where: str) -> None:
    """Raise `InputError` unless every rank gets rows of every global batch."""
    if batch_size % workers:
        raise InputError(
            f"batch_size {batch_size} is not divisible by {workers} workers: use a multiple "
            f"of {workers} (e.g. {batch_size - batch_size % workers or workers}) or other workers"
        )
    last = n_train % batch_size
    if 0 < last < workers:
        raise InputError(
            f"{where}: {n_train} train rows leave a last batch of {last} rows, fewer than "
            f"{workers} workers: change batch_size or the number of workers"
        )
