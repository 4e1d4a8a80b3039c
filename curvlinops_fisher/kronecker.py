r"""Factor rows of linear layers in Kronecker form.

For a fully connected layer :math:`\mathbf{z}_n = \mathbf{W}\mathbf{a}_n +
\mathbf{b}` applied once per data point ``n`` (input ``[N, in]``), the part of a
factor row :math:`\mathbf{u}_i = \sqrt{c}\,\mathbf{J}_t^\top\mathbf{B}_t\mathbf{e}_r`
(row ``i`` of data point ``n(i)``) that belongs to the layer's weight is a Kronecker
product, and the part of its bias the output gradient itself:

.. math::
    \mathbf{u}_i\big|_{\mathbf{W}} = \operatorname{vec}\big(\mathbf{g}_i
    \mathbf{a}_{n(i)}^\top\big), \qquad
    \mathbf{u}_i\big|_{\mathbf{b}} = \mathbf{g}_i, \qquad
    \mathbf{g}_i = \frac{\partial \langle \sqrt{c}\,\mathbf{B}_t\mathbf{e}_r,
    \mathbf{f}_t\rangle}{\partial \mathbf{z}_{n(i)}} .

So a row costs ``out + in`` numbers per layer instead of ``out * in``, and the
reductions of :class:`~curvlinops_fisher.rows.FactorRows` become cheaper:

- Gram matrix: :math:`\mathbf{u}_i^\top\mathbf{u}_j = \sum_l (\mathbf{g}_{il}^\top
  \mathbf{g}_{jl})(\mathbf{a}_{n(i)l}^\top\mathbf{a}_{n(j)l} + 1)` (the ``+ 1`` if
  the bias is a parameter): :math:`n^2 \sum_l (\text{in}_l + \text{out}_l)`
  multiply-adds instead of :math:`n^2 P`;
- dense matrix: the rows of a data point share :math:`\mathbf{a}_n`, so with
  :math:`\mathbf{M}_n = \sum_{i \in n} \mathbf{g}_{il}\mathbf{g}_{im}^\top` the block
  of layers ``l, m`` is :math:`\sum_n \mathbf{M}_n \otimes \mathbf{a}_{nl}
  \mathbf{a}_{nm}^\top`: :math:`N P_l P_m` instead of :math:`n P_l P_m`
  multiply-adds, ``R`` times fewer (``R = C`` for the GGN);
- diagonal :math:`\sum_n (\sum_{i \in n} \mathbf{g}_i^{\odot 2})
  (\mathbf{a}_n^{\odot 2})^\top` and trace likewise;
- :math:`\mathbf{U}^\top\mathbf{W}` and :math:`\mathbf{U}\mathbf{V}` as matrix
  products with the layer's ``[N, in]`` inputs.

The output gradients of all rows come from one VJP with respect to zero "probes"
added to the layers' outputs (forward hooks), ``vmap``-ed over the ``D R``
cotangents that serve every data point at once (``D`` loss terms of ``R`` rows per
data point). This needs data points that the model treats independently and
parameters that the model uses only through these layer calls; both are checked on
every batch by comparing :math:`\mathbf{U}^\top\boldsymbol\omega` for random
weights :math:`\boldsymbol\omega` with one VJP of the model with respect to its
parameters. Where the form does not apply, :func:`kronecker_rows` returns ``None``
and the caller computes explicit rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.nn import Linear, Module

from curvlinops_fisher.accumulation import DenseAccumulator, accumulation_dtype
from curvlinops_fisher.rows import CHECK_RTOL, CHECK_SEED, LinearizedBatch

#: Chunks of output rows into which :meth:`KroneckerRows.add_upper_dense` splits a
#: parameter's diagonal block: each chunk multiplies its columns from its own first
#: output on, so the block takes about ``(1 + 1 / chunks) / 2`` of its flops.
DIAGONAL_OUTPUT_CHUNKS = 8
#: Most data points per matrix product of :meth:`KroneckerRows.column_squares` and
#: :meth:`KroneckerRows.add_upper_dense`. A float32 product over many more data
#: points rounds visibly where it degenerates to a matrix-vector product (a bias:
#: 400,000 points, 1.9e-5 relative in the diagonal, 1.1e-4 normwise in the dense
#: matrix); the products of blocks are summed in float64 (diagonal) or in the
#: block's accumulator (dense: one addition per block; ``addmm_`` instead would
#: accumulate all data points sequentially in single precision).
POINTS_PER_PRODUCT = 4096
#: Side of the square tiles in which :meth:`LinearLayout.mirror_upper` copies.
_MIRROR_TILE = 256
#: Fewest data points (of the batches that :meth:`KroneckerRows.add_to_dense` joins)
#: from which rows with one row per data point (EF, one-sample MC Fisher) add their
#: dense blocks in Kronecker form; with fewer, their explicit rows are formed and
#: their Gram product added. With one row per data point both take
#: :math:`N P^2 / 2` multiply-adds; the Gram product accumulates inside the matrix
#: product, the Kronecker blocks need one more pass over the result, which pays
#: only over enough data points (measured on a 6,000-parameter MLP: 512 points
#: faster, 128 slower).
KRONECKER_DENSE_MIN_POINTS_ONE_ROW = 256


@dataclass(frozen=True)
class LinearLayout:
    """Which fully connected layer owns each differentiated parameter.

    Attributes:
        layers: The distinct ``nn.Linear`` layers, in order of their first parameter.
        slots: For each parameter, in the operator's order: ``(layer index,
            is_weight)``.
    """

    layers: tuple[Linear, ...]
    slots: tuple[tuple[int, bool], ...]

    def slot_shape(self, slot: int) -> tuple[int, int]:
        """``(out, in)`` of a parameter's Kronecker form (``in = 1`` for a bias)."""
        layer_index, is_weight = self.slots[slot]
        layer = self.layers[layer_index]
        return layer.out_features, layer.in_features if is_weight else 1

    @property
    def dim(self) -> int:
        """Number ``P`` of parameters."""
        return sum(prod(self.slot_shape(s)) for s in range(len(self.slots)))

    def spans(self) -> list[slice]:
        """Each parameter's range in the flat parameter vector."""
        sizes = [prod(self.slot_shape(s)) for s in range(len(self.slots))]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [slice(a, a + size) for a, size in zip(starts, sizes)]

    def mirror_upper(self, out: Tensor) -> Tensor:
        """Complete ``out`` ``[P, P]`` from its upper triangle in block form.

        The upper triangle is the one :meth:`KroneckerRows.add_upper_dense` fills:
        the blocks of parameters ``p < q`` (flat order) and, inside the diagonal block
        of a parameter of shape ``(out, in)``, the sub-blocks ``(o, o')`` with
        ``o <= o'`` (``[in, in]`` each; rows ``o * in`` to ``(o + 1) * in``). Every
        other entry is overwritten with its transposed counterpart.
        """
        spans = self.spans()
        for a, span_p in enumerate(spans):
            rows, cols = self.slot_shape(a)
            block = out[span_p, span_p]
            step = cols * max(1, _MIRROR_TILE // cols)  # tiles of whole outputs
            for start in range(0, rows * cols, step):
                stop = start + step
                tile = block[start:stop, start:stop]
                outputs = tile.shape[0] // cols
                view = tile.view(outputs, cols, outputs, cols)
                for o in range(outputs - 1):
                    # entry ((o', i), (o, j)) := entry ((o, j), (o', i)) for o' > o
                    view[o + 1 :, :, o, :] = view[o, :, o + 1 :, :].permute(1, 2, 0)
                _copy_transposed(block[stop:, start:stop], block[start:stop, stop:])
            for span_q in spans[a + 1 :]:
                _copy_transposed(out[span_q, span_p], out[span_p, span_q])
        return out

    @property
    def row_length(self) -> int:
        r"""Numbers per row in Kronecker form, :math:`\sum (\text{in} + \text{out})`."""
        return sum(sum(self.slot_shape(s)) for s in range(len(self.slots)))


def linear_layout(model: Module, params: Sequence[Tensor]) -> LinearLayout | None:
    """The layout of ``params`` if each is the weight or bias of an ``nn.Linear``.

    Every parameter must live in the model under one name only (not tied), as the
    ``weight`` or ``bias`` of an ``nn.Linear`` layer; otherwise ``None``.

    Args:
        model: The model.
        params: The differentiated parameters.

    Returns:
        The layout, or ``None``.
    """
    occurrences: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        occurrences[id(p)] = occurrences.get(id(p), 0) + 1
    owners: dict[int, tuple[Linear, bool]] = {}
    for module in model.modules():
        if type(module) is Linear:  # subclasses may change the forward
            owners[id(module.weight)] = (module, True)
            if module.bias is not None:
                owners[id(module.bias)] = (module, False)
    layers: list[Linear] = []
    slots = []
    for p in params:
        if id(p) not in owners or occurrences.get(id(p)) != 1:
            return None
        module, is_weight = owners[id(p)]
        index = next((i for i, m in enumerate(layers) if m is module), len(layers))
        if index == len(layers):
            layers.append(module)
        slots.append((index, is_weight))
    if not slots:
        return None
    return LinearLayout(tuple(layers), tuple(slots))


class _NotKronecker(Exception):
    """A layer call does not have the form the Kronecker rows need."""


@dataclass
class KroneckerRows:
    r"""The factor rows of one batch in Kronecker form (see the module docstring).

    Row ``i`` belongs to data point ``i // rows_per_point``. Implements
    :class:`~curvlinops_fisher.rows.FactorRows`.

    Attributes:
        layout: The parameters' layers.
        inputs: Per layer, its inputs :math:`\mathbf{a}_n`, ``[N, in]``.
        output_grads: Per layer, the rows' output gradients :math:`\mathbf{g}_i`,
            ``[n, out]``.
        rows_per_point: ``D R``, the number of rows per data point.
    """

    layout: LinearLayout
    inputs: tuple[Tensor, ...]
    output_grads: tuple[Tensor, ...]
    rows_per_point: int

    @classmethod
    def concatenate(cls, parts: Sequence[KroneckerRows]) -> KroneckerRows:
        """The rows of several batches as one batch (same layout and rows per point)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        if any(
            r.layout != first.layout or r.rows_per_point != first.rows_per_point
            for r in parts
        ):
            raise ValueError("Only rows of one layout and rows per point concatenate.")
        return cls(
            first.layout,
            tuple(torch.cat(t) for t in zip(*(r.inputs for r in parts))),
            tuple(torch.cat(t) for t in zip(*(r.output_grads for r in parts))),
            first.rows_per_point,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the inputs and output gradients."""
        return sum(t.nbytes for t in (*self.inputs, *self.output_grads))

    @property
    def num_rows(self) -> int:
        """Number ``n`` of rows."""
        return self.output_grads[0].shape[0]

    @property
    def num_points(self) -> int:
        """Number ``N`` of data points."""
        return self.inputs[0].shape[0]

    def _left(self, slot: int) -> Tensor:
        """The slot's per-data-point input: the layer's ``[N, in]``, ``[N, 1]`` ones for a bias."""
        layer_index, is_weight = self.layout.slots[slot]
        A = self.inputs[layer_index]
        return A if is_weight else A.new_ones(A.shape[0], 1)

    def _grads(self, slot: int) -> Tensor:
        """The slot's output gradients, ``[N, rows_per_point, out]``."""
        G = self.output_grads[self.layout.slots[slot][0]]
        return G.reshape(self.num_points, self.rows_per_point, G.shape[1])

    def _slots(self) -> Iterator[tuple[int, slice]]:
        """Each slot with its range in the flat parameter vector."""
        yield from enumerate(self.layout.spans())

    # ------------------------------------------------------------ reductions
    def gram(self, other: KroneckerRows | None = None) -> Tensor:
        r""":math:`\mathbf{U}\mathbf{U}'^\top` of this batch's rows and ``other``'s (default: its own), ``[n, n']``."""
        other = self if other is None else other
        gram = self.output_grads[0].new_zeros(self.num_rows, other.num_rows)
        for slot, _ in self._slots():
            products = self._left(slot) @ other._left(slot).mT
            products = products.repeat_interleave(self.rows_per_point, 0)
            products = products.repeat_interleave(other.rows_per_point, 1)
            G, G_other = (
                r.output_grads[r.layout.slots[slot][0]] for r in (self, other)
            )
            gram.addcmul_(G @ G_other.mT, products)
        return gram

    def transpose_product(self, W: Tensor) -> Tensor:
        r""":math:`\mathbf{U}^\top\mathbf{W}` for ``W`` ``[n, k]``, shape ``[P, k]``."""
        k = W.shape[1]
        out = W.new_empty(self.layout.dim, k)
        weights = W.reshape(self.num_points, self.rows_per_point, k, 1)
        for slot, span in self._slots():
            # sum_i w_ik g_i a_n(i)^T = sum_n (sum_{i in n} w_ik g_i) a_n^T
            summed = (self._grads(slot).unsqueeze(2) * weights).sum(1)  # [N, k, out]
            block = summed.flatten(1).mT @ self._left(slot)  # [k * out, in]
            out[span] = block.reshape(k, -1).mT
        return out

    def product(self, V: Tensor) -> Tensor:
        r""":math:`\mathbf{U}\mathbf{V}` for ``V`` ``[P, k]``, shape ``[n, k]``."""
        k = V.shape[1]
        out = V.new_zeros(self.num_points, self.rows_per_point, k)
        for slot, span in self._slots():
            rows, cols = self.layout.slot_shape(slot)
            V_slot = V[span].reshape(rows, cols, k)
            # g_i^T V_k a_n: first V_k a_n for every data point, [N, out, k]
            projected = torch.einsum("nj,ojk->nok", self._left(slot), V_slot)
            out.baddbmm_(self._grads(slot), projected)
        return out.reshape(self.num_rows, k)

    def add_upper_dense(self, out: Tensor, chunk_bytes: int) -> Tensor:
        r"""Add :math:`\mathbf{U}^\top\mathbf{U}` to the upper triangle of ``out`` in block form.

        Fills what :meth:`LinearLayout.mirror_upper` reads (and may add to entries it
        overwrites), which completes the matrix once after all batches. Block ``p, q``
        of two parameters is

        .. math::
            \sum_n \mathbf{M}_n \otimes \mathbf{a}_{np}\mathbf{a}_{nq}^\top, \qquad
            \mathbf{M}_n = \sum_{i \in n} \mathbf{g}_{ip}\mathbf{g}_{iq}^\top,

        whose entry :math:`((o, j), (o', j'))` is :math:`\sum_n M_n[o, o']\,
        a_{np}[j]\,a_{nq}[j']`: the matrix product of :math:`\mathbf{M}` ``[N, out_p
        out_q]`` with the Khatri-Rao product of the inputs ``[N, in_p in_q]``, added
        into ``out`` with the axes permuted. :math:`N P_p P_q` multiply-adds against
        :math:`n P_p P_q` for the explicit rows. Inside a diagonal block only the
        sub-blocks :math:`o' \geq o_0` of each chunk of outputs :math:`[o_0, o_1)` are
        multiplied (:data:`DIAGONAL_OUTPUT_CHUNKS` chunks): about
        :math:`(1 + 1 / \text{chunks}) / 2` of the block's flops. Outputs (and, if one
        Khatri-Rao product does not fit, data points) go in chunks of at most
        ``chunk_bytes``.
        """
        slots = list(self._slots())
        for a, (p, span_p) in enumerate(slots):
            for q, span_q in slots[a:]:
                self._add_dense_block(out[span_p, span_q], p, q, chunk_bytes)
        return out

    def _add_dense_block(
        self, target: Tensor, p: int, q: int, chunk_bytes: int
    ) -> None:
        r"""Add block ``p, q`` (upper part if ``p == q``) to ``target`` (see :meth:`add_upper_dense`)."""
        (out_p, in_p), (out_q, in_q) = (self.layout.slot_shape(s) for s in (p, q))
        G_p, G_q = self._grads(p), self._grads(q)  # [N, rows_per_point, out]
        L_p, L_q = self._left(p), self._left(q)
        itemsize = G_p.dtype.itemsize
        inputs = in_p * in_q
        diagonal = p == q
        N = self.num_points
        # Several blocks of data points hold a block's product next to the sum.
        held = 2 if N > POINTS_PER_PRODUCT else 1
        width = -(-out_p // DIAGONAL_OUTPUT_CHUNKS) if diagonal else out_p
        width = max(1, min(width, chunk_bytes // (held * out_q * inputs * itemsize)))
        step = max(1, chunk_bytes // ((inputs + width * out_q) * itemsize))
        step = min(step, POINTS_PER_PRODUCT)
        whole = _khatri_rao(L_p, L_q) if step >= N else None
        block = target.view(out_p, in_p, out_q, in_q)
        for o0 in range(0, out_p, width):
            o1 = min(out_p, o0 + width)
            start = o0 if diagonal else 0
            products: Tensor | None = None
            for n0 in range(0, N, step):
                part = slice(n0, n0 + step)
                khatri_rao = (
                    _khatri_rao(L_p[part], L_q[part]) if whole is None else whole
                )
                M = G_p[part, :, o0:o1].mT @ G_q[part, :, start:]
                M = M.flatten(1).mT  # [(o1 - o0) (out_q - start), n]
                if products is None:
                    products = M @ khatri_rao
                else:  # not addmm_: with few rows its GEMV adds sequentially into C
                    products += M @ khatri_rao
            block[o0:o1, :, start:, :] += products.view(
                o1 - o0, out_q - start, in_p, in_q
            ).permute(0, 2, 1, 3)

    def squared_norm(self, dtype: torch.dtype | None = None) -> Tensor:
        r"""The trace contribution :math:`\sum_i \|\mathbf{u}_i\|^2` (a scalar).

        :math:`\sum_l \sum_n (\sum_{i \in n} \|\mathbf{g}_{il}\|^2)
        (\|\mathbf{a}_{nl}\|^2 + 1)`: the per-data-point sums in the factors'
        precision, the sum over data points and layers in float64 (a float32 dot
        product of millions of data points loses digits).

        Args:
            dtype: Data type of the result (``None``: the factors').
        """
        acc = _accumulation_dtype(self.output_grads[0])
        total = self.output_grads[0].new_zeros((), dtype=acc)
        for slot, _ in self._slots():
            grad_norms = self._grads(slot).square().sum((1, 2))  # [N]
            total += grad_norms.to(acc) @ self._left(slot).square().sum(1).to(acc)
        return total.to(dtype or self.output_grads[0].dtype)

    def column_squares(self, dtype: torch.dtype | None = None) -> Tensor:
        r"""The diagonal contribution :math:`\sum_i \mathbf{u}_i^{\odot 2}`, ``[P]``.

        Per parameter :math:`\sum_n (\sum_{i \in n} \mathbf{g}_i^{\odot 2})
        (\mathbf{a}_n^{\odot 2})^\top`: one matrix product per block of
        :data:`POINTS_PER_PRODUCT` data points in the factors' precision, the
        blocks summed in float64 (one float32 product over 400,000 data points loses
        1.9e-5 relative in the bias, a matrix-vector product).

        Args:
            dtype: Data type of the result (``None``: the factors').
        """
        acc = _accumulation_dtype(self.output_grads[0])
        parts = []
        for slot, _ in self._slots():
            grad_squares = self._grads(slot).square().sum(1)  # [N, out]
            left_squares = self._left(slot).square()  # [N, in]
            total = grad_squares.new_zeros(
                grad_squares.shape[1], left_squares.shape[1], dtype=acc
            )
            for start in range(0, self.num_points, POINTS_PER_PRODUCT):
                span = slice(start, start + POINTS_PER_PRODUCT)
                total += grad_squares[span].mT @ left_squares[span]
            parts.append(total.flatten())
        return torch.cat(parts).to(dtype or self.output_grads[0].dtype)

    def add_squared_norm(self, out: Tensor) -> Tensor:
        """Add :meth:`squared_norm` to the scalar ``out`` (in ``out``'s type)."""
        return out.add_(self.squared_norm(dtype=out.dtype))

    def add_column_squares(self, out: Tensor) -> Tensor:
        """Add :meth:`column_squares` to ``out`` ``[P]`` (in ``out``'s type)."""
        return out.add_(self.column_squares(dtype=out.dtype))

    def add_to_dense(self, dense: DenseAccumulator, chunk_bytes: int) -> None:
        r"""Add :math:`\mathbf{U}^\top\mathbf{U}`, joined with the next batches' rows.

        Batches of equal rows per point are held back and joined (up to
        ``chunk_bytes`` of factors), so the matrix products run over all their data
        points at once and ``dense`` is visited once per group; see
        :func:`_add_joined`.
        """
        dense.hold(self, self.nbytes, self.rows_per_point, _add_joined, chunk_bytes)

    def rows(self) -> Tensor:
        """The rows in explicit form, ``[n, P]``."""
        parts = []
        for slot, _ in self._slots():
            G = self._grads(slot)
            L = self._left(slot)
            outer = G.unsqueeze(3) * L[:, None, None, :]  # [N, DR, out, in]
            parts.append(outer.reshape(self.num_rows, -1))
        return torch.cat(parts, dim=1)


def _add_joined(parts: list[KroneckerRows], dense: DenseAccumulator) -> None:
    r"""Add the held-back batches' :math:`\mathbf{U}^\top\mathbf{U}`, joined.

    Their blocks go to the upper triangle only (:meth:`KroneckerRows.add_upper_dense`:
    :math:`N P^2 / 2` multiply-adds against :math:`n P^2 / 2` for the Gram product of
    the ``n = N D R`` explicit rows), mirrored once (:meth:`LinearLayout.mirror_upper`).
    A group with one row per data point and fewer than
    :data:`KRONECKER_DENSE_MIN_POINTS_ONE_ROW` data points adds the Gram product of
    its rows instead, formed from the factors.
    """
    joined = KroneckerRows.concatenate(parts)
    if (
        joined.rows_per_point == 1
        and joined.num_points < KRONECKER_DENSE_MIN_POINTS_ONE_ROW
    ):
        dense.add_rows([joined.rows()])
    else:
        dense.add_upper(
            lambda out: joined.add_upper_dense(out, dense.chunk_bytes),
            joined.layout.mirror_upper,
        )


def _accumulation_dtype(like: Tensor) -> torch.dtype:
    """:func:`accumulation_dtype` of a tensor."""
    return accumulation_dtype(like.dtype, like.device)


def _copy_transposed(dst: Tensor, src: Tensor) -> None:
    """``dst[:] = src.mT`` in square tiles of side :data:`_MIRROR_TILE`.

    One transposed copy of a large block reads (or writes) each row on another
    memory page; tiles keep the pages of a step few.
    """
    rows, cols = dst.shape
    for r in range(0, rows, _MIRROR_TILE):
        for c in range(0, cols, _MIRROR_TILE):
            dst[r : r + _MIRROR_TILE, c : c + _MIRROR_TILE] = src[
                c : c + _MIRROR_TILE, r : r + _MIRROR_TILE
            ].mT


def _khatri_rao(L: Tensor, R: Tensor) -> Tensor:
    """Row-wise Kronecker products of ``L`` ``[N, a]`` and ``R`` ``[N, b]``: ``[N, a b]``."""
    return (L.unsqueeze(2) * R.unsqueeze(1)).flatten(1)


def kronecker_rows(
    batch: LinearizedBatch, layout: LinearLayout
) -> KroneckerRows | None:
    r"""The factor rows of a linearized batch in Kronecker form, if they have it.

    ``None`` if a layer is not called exactly once on an input ``[N, in]`` (``N``
    the batch's leading output axis), if the batch's terms are not ``D`` per data
    point, or if the check of :math:`\mathbf{U}^\top\boldsymbol\omega` against a
    VJP with respect to the parameters fails (parameters used outside the layer
    calls, data points that interact).

    Args:
        batch: A :class:`~curvlinops_fisher.rows.LinearizedBatch`.
        layout: The parameters' layers (:func:`linear_layout`).

    Returns:
        The rows, or ``None``.
    """
    output_shape = batch.output_shape
    B = batch.scaled_factor
    T, C, R = B.shape
    if len(output_shape) == 0 or output_shape[0] == 0 or T % output_shape[0]:
        return None
    N = output_shape[0]
    D = T // N
    # Cotangent (d, r) serves every data point at once: B[n D + d, :, r] at term n D + d.
    eye = torch.eye(D, dtype=B.dtype, device=B.device)
    W = torch.einsum("ndcr,de->drnec", B.reshape(N, D, C, R), eye)
    cotangents = batch.loss.unflatten(W.reshape(D * R, T, C), output_shape, lead=1)
    try:
        inputs, vjp_fn = _probed_forward(batch, layout, N)
    except _NotKronecker:
        return None
    with torch.no_grad():
        (grads,) = vmap(vjp_fn)(cotangents)  # per layer [D R, N, out]
    output_grads = tuple(g.transpose(0, 1).reshape(N * D * R, -1) for g in grads)
    rows = KroneckerRows(layout, inputs, output_grads, D * R)
    return rows if _agrees_with_vjp(rows, batch) else None


def _probed_forward(
    batch: LinearizedBatch, layout: LinearLayout, N: int
) -> tuple[tuple[Tensor, ...], Callable[..., tuple[tuple[Tensor, ...]]]]:
    """Forward pass with a zero probe added to each layer's output.

    Returns:
        The layers' inputs ``[N, in]`` and the VJP with respect to the probes.

    Raises:
        _NotKronecker: If a layer is not called exactly once on an ``[N, in]`` input.
    """
    calls = [0] * len(layout.layers)

    def forward(probes: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        recorded: list[Tensor | None] = [None] * len(layout.layers)

        def make_hook(index: int) -> Callable[..., Tensor]:
            def hook(module: Module, args: tuple, output: Tensor) -> Tensor:
                x = args[0]
                calls[index] += 1
                if calls[index] > 1 or x.ndim != 2 or x.shape[0] != N:
                    raise _NotKronecker
                recorded[index] = x
                return output + probes[index]

            return hook

        handles = [
            layer.register_forward_hook(make_hook(i))
            for i, layer in enumerate(layout.layers)
        ]
        try:
            output = batch.model_function(batch.params, batch.X)
        finally:
            for handle in handles:
                handle.remove()
        if any(count != 1 for count in calls):
            raise _NotKronecker
        return output, tuple(recorded)

    probes = tuple(
        batch.output.new_zeros(N, layer.out_features) for layer in layout.layers
    )
    with torch.no_grad():  # see linearize_batch
        _, vjp_fn, inputs = vjp(forward, probes, has_aux=True)
    return inputs, vjp_fn


def _agrees_with_vjp(rows: KroneckerRows, batch: LinearizedBatch) -> bool:
    r"""Whether :math:`\mathbf{U}^\top\boldsymbol\omega` equals the model's VJP.

    With random row weights :math:`\boldsymbol\omega`, the Kronecker rows give
    :math:`\sum_i \omega_i \mathbf{u}_i`; one VJP of the batch's forward pass with
    the cotangent :math:`\sum_i \omega_i \sqrt{c}\,\mathbf{B}_t\mathbf{e}_r` gives
    the same vector exactly when every parameter enters through the probed layer
    calls and each data point's output depends on its own probes only.
    """
    B = batch.scaled_factor
    T, C, R = B.shape
    generator = torch.Generator(device=B.device).manual_seed(CHECK_SEED)
    omega = torch.randn(T, R, generator=generator, dtype=B.dtype, device=B.device)
    cotangent = batch.loss.unflatten(
        torch.einsum("tcr,tr->tc", B, omega), batch.output_shape
    )
    with torch.no_grad():
        (grads,) = batch.vjp_fn(cotangent)
    expected = torch.cat([g.flatten() for g in grads])
    got = rows.transpose_product(omega.reshape(-1, 1)).flatten()
    rtol = CHECK_RTOL.get(B.dtype.itemsize, 1e-2)
    error = torch.linalg.vector_norm(got - expected)
    scale = torch.linalg.vector_norm(expected) + torch.finfo(B.dtype).tiny
    return bool(error <= rtol * scale)


@dataclass
class KroneckerFactor:
    r"""The factor :math:`\mathbf{U}` of several batches, each in Kronecker form.

    The rows are the batches' rows in order; every method works on the batches'
    factors without forming a row (except :meth:`rows`). Implements
    :class:`~curvlinops_fisher.rows.FactorRows`.

    Attributes:
        batches: The batches' rows (at least one batch).
    """

    batches: tuple[KroneckerRows, ...]

    @classmethod
    def joined(cls, batches: Sequence[KroneckerRows]) -> KroneckerFactor:
        """The factor of ``batches``, consecutive ones of equal rows per point joined.

        Joined batches make each reduction one matrix product per layer over all
        their data points instead of one per batch (same rows, same order).
        """
        groups: list[list[KroneckerRows]] = []
        for rows in batches:
            if groups and groups[-1][0].rows_per_point == rows.rows_per_point:
                groups[-1].append(rows)
            else:
                groups.append([rows])
        return cls(tuple(KroneckerRows.concatenate(group) for group in groups))

    @property
    def layout(self) -> LinearLayout:
        """The parameters' layers."""
        return self.batches[0].layout

    @property
    def offsets(self) -> list[int]:
        """Index of each batch's first row, then the number of rows."""
        offsets = [0]
        for rows in self.batches:
            offsets.append(offsets[-1] + rows.num_rows)
        return offsets

    @property
    def num_rows(self) -> int:
        """Number ``n`` of rows."""
        return self.offsets[-1]

    @property
    def row_length(self) -> int:
        """Numbers per row in Kronecker form."""
        return self.layout.row_length

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the factors."""
        return self.batches[0].output_grads[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of the factors."""
        return self.batches[0].output_grads[0].device

    def product(self, V: Tensor) -> Tensor:
        r""":math:`\mathbf{U}\mathbf{V}` for ``V`` ``[P, k]``, shape ``[n, k]``."""
        return torch.cat([rows.product(V) for rows in self.batches])

    def transpose_product(self, W: Tensor) -> Tensor:
        r""":math:`\mathbf{U}^\top\mathbf{W}` for ``W`` ``[n, k]``, shape ``[P, k]``."""
        offsets = self.offsets
        out = W.new_zeros(self.layout.dim, W.shape[1])
        for b, rows in enumerate(self.batches):
            out += rows.transpose_product(W[offsets[b] : offsets[b + 1]])
        return out

    def gram(self) -> Tensor:
        r"""The Gram matrix :math:`\mathbf{U}\mathbf{U}^\top`, ``[n, n]``."""
        offsets = self.offsets
        gram = self.batches[0].output_grads[0].new_zeros(self.num_rows, self.num_rows)
        for a, rows_a in enumerate(self.batches):
            span_a = slice(offsets[a], offsets[a + 1])
            for b in range(a, len(self.batches)):
                block = rows_a.gram(self.batches[b])
                gram[span_a, offsets[b] : offsets[b + 1]] = block
                gram[offsets[b] : offsets[b + 1], span_a] = block.mT
        return gram

    def add_squared_norm(self, out: Tensor) -> Tensor:
        r"""Add :math:`\|\mathbf{U}\|_F^2` to the scalar ``out``, batch by batch."""
        for rows in self.batches:
            rows.add_squared_norm(out)
        return out

    def add_column_squares(self, out: Tensor) -> Tensor:
        r"""Add the squared column norms of :math:`\mathbf{U}` to ``out`` ``[P]``."""
        for rows in self.batches:
            rows.add_column_squares(out)
        return out

    def add_to_dense(self, dense: DenseAccumulator, chunk_bytes: int) -> None:
        r"""Add :math:`\mathbf{U}^\top\mathbf{U}` to ``dense``, batch by batch."""
        for rows in self.batches:
            rows.add_to_dense(dense, chunk_bytes)

    def rows(self) -> Tensor:
        """The rows in explicit form, ``[n, P]``."""
        return torch.cat([rows.rows() for rows in self.batches])
