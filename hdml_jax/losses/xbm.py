r"""Cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020)
for the pair losses, with pytorch-metric-learning's ``CrossBatchMemory`` semantics, as pure JAX
functions.

The memory is a ring buffer of the last ``M`` embeddings and their labels. Each step enqueues the
batch, then computes a pair loss whose anchors are the batch rows and whose positives /
negatives are the memory rows (``ref_embeddings`` of ``hdml_jax.losses.pair`` /
``triplet_margin``)::

    memory = xbm_init(memory_size=M, dim=d)                       # once, in the train state
    loss, memory = xbm_loss(contrastive_loss, x, y, memory)       # every step, inside jit

``CrossBatchMemory`` is a pytree (a NamedTuple of arrays) and every function here is pure: the
memory is part of the train state, returned by the step, checkpointed and restored with it, so a
resumed run sees the very same memory (and losses) as an uninterrupted one. Nothing is stored on
the side. Shapes are fixed (``M``, ``d``, ``B``), so a step compiles once.

Semantics of one ``xbm_loss`` step (PML 2.x ``CrossBatchMemory.forward`` without
``indices_tuple``):

1. the unmasked batch rows are written, in order and ``stop_gradient``-ed, to the slots
   ``position, position + 1, ...`` (mod ``M``), overwriting the oldest entries;
2. the loss runs on ``(x (B, d), y (B,))`` against the memory *after* the write
   (``(M, d)``, the slots not yet written left out), so the batch is compared with itself
   through its own copies, and with up to ``M - B`` older embeddings;
3. all label pairs ``(i, j)``, ``y_i = ȳ_j`` positive and ``y_i ≠ ȳ_j`` negative, or a miner's
   output on ``(x, y, memory)``; then the *self comparisons* are removed: the positive pairs
   ``(i, s_i)`` with ``s_i`` the slot that received row ``i`` (for triplets: every ``(i, s_i, n)``).
   That is PML's ``remove_self_comparisons``, which touches positives only (a row is never its own
   negative).

No gradient reaches the memory (its rows are constants, as PML's detached queue); the gradient of
the loss w.r.t. the batch comes from the anchor side only.

Differences from PML, on purpose: a batch of one row has its self comparison removed too (PML's
``remove_self_comparisons`` takes a one-row batch for a wrapped one, ``e <= s``, and keeps it);
PML's extra ``indices_tuple`` (concatenated to the memory's tuples) is not taken; a batch larger
than the memory is an error even with ``enqueue_mask`` (PML checks only without); the memory keeps
its dtype (PML casts it to the embeddings' dtype at every call); ``mask`` (padding rows, neither
written nor anchors) has no PML counterpart; ``lifted_structure_loss`` and ``triplet_margin_loss``
with ``swap=True`` refuse reference rows, which PML accepts but mis-indexes (see there).
``batch_hard_miner`` returns PML's ``BatchHardMiner`` triplets as pair masks: pass
``miner_pairs_are_triplets=True`` to remove self comparisons triplet-wise as PML does.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdml_jax.losses import _common
from hdml_jax.losses._pair_common import WindowedTriplets

# The keyword arguments that ``xbm_loss`` itself passes to the loss.
_OWN_KWARGS = ("ref_embeddings", "ref_labels", "ref_mask", "pos_mask", "neg_mask", "triplet_mask")


class CrossBatchMemory(NamedTuple):
    """The XBM ring buffer: a pytree, part of the train state (checkpoint it with the rest).

    Attributes:
      embeddings: ``(M, d)`` float (float32 by default): the stored (detached) embeddings.
      labels: ``(M,)`` int32: their labels.
      filled: ``(M,)`` bool: the slots written at least once (PML's prefix ``[:queue_idx]`` before
        the buffer first wraps; all True after).
      position: int32 scalar: the next slot to write (PML's ``queue_idx``).
    """

    embeddings: jax.Array
    labels: jax.Array
    filled: jax.Array
    position: jax.Array

    @property
    def size(self) -> int:
        """``M``, the number of slots."""
        return self.embeddings.shape[0]


def xbm_init(memory_size: int, dim: int, dtype=jnp.float32) -> CrossBatchMemory:
    """An empty memory of ``memory_size`` slots of dimension ``dim`` (PML's ``reset_queue``).

    Args:
      memory_size: ``M ≥ 1``, the number of embeddings kept (PML's ``memory_size``).
      dim: ``d ≥ 1``, the embedding dimension (PML's ``embedding_size``).
      dtype: the floating dtype of the stored embeddings (float32; bf16 halves the memory, the
        losses still compute in float32).

    Returns:
      ``CrossBatchMemory`` with zero embeddings and labels, nothing filled, ``position = 0``.
    """
    for name, value in (("memory_size", memory_size), ("dim", dim)):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number is None or number < 1:
            raise ValueError(f"xbm_init {name} must be a positive integer, got {value!r}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"xbm_init dtype must be a floating dtype, got {dtype!r}.")
    memory_size, dim = operator.index(memory_size), operator.index(dim)
    return CrossBatchMemory(
        embeddings=jnp.zeros((memory_size, dim), dtype),
        labels=jnp.zeros((memory_size,), jnp.int32),
        filled=jnp.zeros((memory_size,), bool),
        position=jnp.zeros((), jnp.int32),
    )


def _check_memory(memory: CrossBatchMemory, owner: str) -> None:
    if not isinstance(memory, CrossBatchMemory):
        raise ValueError(f"{owner} memory must be a CrossBatchMemory (see xbm_init), got {type(memory)}.")
    shape = jnp.shape(memory.embeddings)
    if len(shape) != 2 or shape[0] < 1:
        raise ValueError(f"{owner}: memory.embeddings must have shape (memory_size ≥ 1, dim), got {shape}.")
    if jnp.shape(memory.labels) != shape[:1] or jnp.shape(memory.filled) != shape[:1]:
        raise ValueError(
            f"{owner}: memory.labels and memory.filled must have shape ({shape[0]},), got "
            f"{jnp.shape(memory.labels)} and {jnp.shape(memory.filled)}."
        )
    if jnp.shape(memory.position) != ():
        raise ValueError(
            f"{owner}: memory.position must be a scalar, got shape {jnp.shape(memory.position)}."
        )


def xbm_enqueue(
    memory: CrossBatchMemory,
    embeddings: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
) -> tuple[CrossBatchMemory, jax.Array]:
    r"""Write a batch into the ring buffer (PML's ``CrossBatchMemory.add_to_memory``).

    With ``k_i = #{j < i : mask_j}`` (the rank of row ``i`` among the kept rows) and ``K = Σ mask``::

        s_i            = (position + k_i) mod M          for the rows with mask_i (else -1)
        embeddings'[s_i] = stop_gradient(x_i)    labels'[s_i] = y_i    filled'[s_i] = True
        position'      = (position + K) mod M

    Other slots are unchanged. Fixed shapes, jit-safe (a scatter whose masked rows target an
    out-of-range slot and are dropped). ``B ≤ M`` guarantees distinct slots.

    Args:
      memory: the current ``CrossBatchMemory``.
      embeddings: ``(B, d)`` float, ``B ≤ M``; stored in the memory's dtype, without gradient.
      labels: ``(B,)`` int.
      mask: optional ``(B,)`` bool: only the True rows are written (padding is not).

    Returns:
      ``(new_memory, slots)``: ``slots (B,) int32`` is the slot each row went to, -1 for masked rows.

    Raises:
      ValueError: ``B > M`` (the batch would overwrite itself; PML asserts it too), shapes that
        disagree with the memory.
    """
    owner = "xbm_enqueue"
    _check_memory(memory, owner)
    _common.check_embeddings(embeddings)
    batch, dim = jnp.shape(embeddings)
    size, memory_dim = memory.embeddings.shape
    _common.check_labels(labels, batch)
    if dim != memory_dim:
        raise ValueError(
            f"{owner}: embeddings have dimension {dim} but the memory holds dimension {memory_dim}."
        )
    if batch > size:
        raise ValueError(
            f"{owner}: a batch of {batch} rows does not fit a memory of {size} slots (the batch would "
            "overwrite its own rows); use memory_size >= batch size (XBM memories are usually many "
            "batches long) or split the batch."
        )
    mask = _common.resolve_mask(mask, batch)
    rank = jnp.cumsum(mask.astype(jnp.int32)) - 1
    position = jnp.asarray(memory.position, jnp.int32)
    slots = jnp.where(mask, (position + rank) % size, -1).astype(jnp.int32)
    target = jnp.where(mask, slots, size)  # out of range: mode="drop" skips the masked rows
    values = jax.lax.stop_gradient(jnp.asarray(embeddings)).astype(memory.embeddings.dtype)
    new = CrossBatchMemory(
        embeddings=memory.embeddings.at[target].set(values, mode="drop"),
        labels=memory.labels.at[target].set(jnp.asarray(labels).astype(memory.labels.dtype), mode="drop"),
        filled=memory.filled.at[target].set(True, mode="drop"),
        position=(position + jnp.sum(mask, dtype=jnp.int32)) % size,
    )
    return new, slots


def xbm_loss(
    loss_fn: Callable[..., jax.Array],
    embeddings: jax.Array,
    labels: jax.Array,
    memory: CrossBatchMemory,
    *,
    mask: jax.Array | None = None,
    enqueue_mask: jax.Array | None = None,
    miner: Callable[..., dict[str, jax.Array]] | None = None,
    miner_pairs_are_triplets: bool = False,
    **loss_kwargs,
) -> tuple[jax.Array, CrossBatchMemory]:
    r"""One XBM step: enqueue the batch, then the pair loss of the batch against the memory.

    PML's ``CrossBatchMemory(loss, embedding_size, memory_size, miner)(x, y)``. With ``M̄`` the
    memory after ``xbm_enqueue(memory, x, y, mask)`` and ``s_i`` the slot of row ``i``::

        P = {(i, j) : mask_i, filled_j, y_i = ȳ_j, j ≠ s_i}        (B, M)
        N = {(i, j) : mask_i, filled_j, y_i ≠ ȳ_j}                 (B, M)
        L = loss_fn(x, y, ref_embeddings=sg(ē), ref_labels=ȳ, ref_mask=filled,
                    pos_mask=P, neg_mask=N, mask=mask, **loss_kwargs)

    ``sg`` is stop-gradient. Given pairs ``P``, ``N`` every loss uses exactly the tuples it would
    derive from the labels (the triplet losses the triplets ``P[a, p] & N[a, n]``), minus the self
    comparisons. With a ``miner``, ``P`` / ``N`` (or ``T (B, M, M)``) are its output on the batch
    against ``M̄``, then the self comparisons ``(i, s_i)`` (``(i, s_i, ·)`` for triplets) removed.

    ``enqueue_mask`` is PML's: only its True rows are written, only its False rows are anchors
    (no self comparison can then arise).

    Args:
      loss_fn: a loss of ``hdml_jax.losses`` taking ``ref_embeddings`` (contrastive,
        multi-similarity, NT-Xent, generalized lifted structure, circle, triplet margin, margin;
        ``lifted_structure_loss`` raises a ``ValueError``), or any function with that signature.
      embeddings: ``(B, d)`` float, ``B ≤ M``. labels: ``(B,)`` int.
      memory: ``CrossBatchMemory`` (``xbm_init``), from the train state.
      mask: optional ``(B,)`` bool: False rows (padding) are neither written nor anchors.
      enqueue_mask: optional ``(B,)`` bool, see above (None: every row is written and an anchor).
      miner: optional ``miner(x, y, *, mask, ref_embeddings, ref_labels, ref_mask) -> dict`` of
        ``pos_mask``/``neg_mask`` ``(B, M)`` or ``triplet_mask`` (``(B, M, M)`` bool or
        ``WindowedTriplets``, whose positive pairs ``(i, s_i)`` are then removed): the miners of
        ``hdml_jax.losses.miners`` (with ``functools.partial`` for their options).
      miner_pairs_are_triplets: the miner's ``pos_mask`` / ``neg_mask`` stand for the triplets
        ``pos[a, p] & neg[a, n]`` (``batch_hard_miner``'s pair form of PML's ``BatchHardMiner``
        triplets): PML then removes whole triplets, so an anchor whose only mined positive was its
        own slot loses its negatives too. False (default): PML's rule for pair miners
        (``MultiSimilarityMiner``), the negatives stay. It matters for the pair losses only.
      **loss_kwargs: the loss's hyperparameters (``distance``, margins, ``beta`` for
        ``margin_loss``, ...). Not the keywords that ``xbm_loss`` sets itself.

    Returns:
      ``(loss, new_memory)``: a float32 scalar (exactly 0 when there is no pair, e.g. all rows
      masked) and the memory to keep in the train state.

    Raises:
      ValueError: ``B > M``, shapes that disagree with the memory, ``loss_kwargs`` holding
        ``ref_*`` / mined masks (PML's extra ``indices_tuple`` is not supported: use a miner), a
        miner output that is neither pairs nor triplets.
    """
    owner = "xbm_loss"
    clash = sorted(set(loss_kwargs) & set(_OWN_KWARGS))
    if clash:
        raise ValueError(
            f"{owner} sets {', '.join(clash)} itself (the memory and the tuples against it); pass a "
            "miner to choose the tuples."
        )
    _check_memory(memory, owner)
    _common.check_embeddings(embeddings)
    batch = jnp.shape(embeddings)[0]
    anchors = _common.resolve_mask(mask, batch)
    if enqueue_mask is None:
        written = anchors
    else:
        if jnp.shape(enqueue_mask) != (batch,):
            raise ValueError(
                f"{owner}: enqueue_mask must have shape ({batch},) (one flag per embedding row), "
                f"got {jnp.shape(enqueue_mask)}."
            )
        enqueue_mask = jnp.asarray(enqueue_mask).astype(bool)
        written = anchors & enqueue_mask
        anchors = anchors & ~enqueue_mask

    new_memory, slots = xbm_enqueue(memory, embeddings, labels, written)
    refs = {
        "ref_embeddings": jax.lax.stop_gradient(new_memory.embeddings),
        "ref_labels": new_memory.labels,
        "ref_mask": new_memory.filled,
    }
    size = new_memory.size
    labels = jnp.asarray(labels)
    # own[i, j]: slot j holds the copy of anchor i just written (never true for rows not written).
    own = slots[:, None] == jnp.arange(size, dtype=jnp.int32)[None, :]
    if miner is None:
        valid = anchors[:, None] & new_memory.filled[None, :]
        same = labels[:, None] == new_memory.labels[None, :]
        mined = {"pos_mask": same & valid & ~own, "neg_mask": ~same & valid}
    else:
        mined = dict(miner(embeddings, labels, mask=anchors, **refs))
        if set(mined) == {"triplet_mask"}:
            triplets = mined["triplet_mask"]
            if isinstance(triplets, WindowedTriplets):
                # (i, s_i, n) for every n: exactly the triplets whose positive pair is (i, s_i).
                triplets = triplets._replace(pos=jnp.asarray(triplets.pos).astype(bool) & ~own)
            else:
                triplets = jnp.asarray(triplets).astype(bool) & ~own[:, :, None]
            mined["triplet_mask"] = triplets
        elif set(mined) == {"pos_mask", "neg_mask"}:
            pos = jnp.asarray(mined["pos_mask"]).astype(bool) & ~own
            neg = jnp.asarray(mined["neg_mask"]).astype(bool)
            if miner_pairs_are_triplets:
                neg = neg & jnp.any(pos, axis=1, keepdims=True)
            mined = {"pos_mask": pos, "neg_mask": neg}
        else:
            raise ValueError(
                f"{owner}: the miner must return {{'pos_mask', 'neg_mask'}} or {{'triplet_mask'}}, "
                f"got keys {sorted(mined)}."
            )
    loss = loss_fn(embeddings, labels, mask=anchors, **refs, **mined, **loss_kwargs)
    return loss, new_memory
