"""Integer dot products straight from GGUF blocks: one row of weights . up to 8 tokens' integer activations.

Legend: a block holds QK values (256 for the K-quants, 32 for Q8_0), a sub-block shares one scale, a group is 16
values (the activations' scale unit, engine.q8_activations). The weight codes are unpacked in registers, meet
the 16-bit activation codes in i16 pair multiply-adds (engine.simd_int8._code_sums) and are scaled per sub-block:

    w . x = sum over sub-blocks of  d_w * sc * xd * (q . x)  +  bias_w * xs

No decoded copy is written anywhere: engine.int8_decoders' scratch round trip (a store and a load of every code
and of two scales per 16 values) cost as much as the dot itself. Each weight block is unpacked once for all tokens
of a call (TOKENS at most, one accumulator register per token), so a decode batch reads the weights from cache
once per 8 tokens rather than per token.

The block bodies live by family (engine.mainline_dots, engine.ik_dots, engine.interleaved_dots; their shared IR in
engine.block_ir); this module dispatches on the type. Types without a kernel keep the decoder path.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from engine import grid_dots, ik_dots, interleaved_dots, mainline_dots, trellis_dots
from engine.block_ir import _I64, TOKENS
from engine.ik_types import quant_type
from engine.simd import _arg_i64

__all__ = ["BLOCK_DOT_TYPES", "TOKENS", "block_dots", "has_block_dot"]

# Each family's row functions: (context, builder, sig, args, tokens, row k of a group) -> the row's IR.
_ROWS = mainline_dots.ROWS | ik_dots.ROWS | interleaved_dots.ROWS | trellis_dots.ROWS | grid_dots.ROWS
BLOCK_DOT_TYPES = tuple(_ROWS)  # the types with a kernel here (a row function per type: its code, row k of a group)


def _call_row(context, builder: ir.IRBuilder, sig, args: list, n_tok: int, qtype: int, k: int) -> None:
    """Call the kernel body of (qtype, row k of its group) for n_tok tokens, emitted once per LLVM module as a
    function of its own: LLVM optimises each body alone, not one function holding every type's (compile time grew
    faster than the number of types), and a call per row span costs nothing next to the span's blocks."""
    name = f"ikctl_block_dot{n_tok}_type{qtype}_row{k}"
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [a.type for a in args]), name=name)
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        body = ir.IRBuilder(fn.append_basic_block("entry"))
        _ROWS[qtype](context, body, sig, list(fn.args), n_tok, k)
        body.ret_void()
    builder.call(fn, args)


def _make_dot(n_tok: int):
    @intrinsic
    def dot(typingctx, qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow):
        sig = types.none(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)

        def codegen(context, builder, signature, args):
            kind = _arg_i64(context, builder, signature, args, 0)
            sig, args = signature.return_type(*signature.args[1:]), args[1:]
            end = builder.append_basic_block("dot_end")
            switch = builder.switch(kind, end)
            krow = _arg_i64(context, builder, sig, args, 13)
            for qt in _ROWS:
                case = builder.append_basic_block(f"dot_type{qt}")
                switch.add_case(ir.Constant(_I64, qt), case)
                builder.position_at_end(case)
                group = quant_type(qt).group
                if group == 1:
                    _call_row(context, builder, sig, args, n_tok, qt, 0)
                    builder.branch(end)
                    continue
                rows = builder.switch(krow, end)  # one body per row of an interleaved group
                for k in range(group):
                    at = builder.append_basic_block(f"dot_type{qt}_row{k}")
                    rows.add_case(ir.Constant(_I64, k), at)
                    builder.position_at_end(at)
                    _call_row(context, builder, sig, args, n_tok, qt, k)
                    builder.branch(end)
            builder.position_at_end(end)
            return context.get_dummy_value()

        return sig, codegen

    dot.__doc__ = f"""out[oo + t * ostride] (+= where add) nblk blocks of weight type qtype (one of BLOCK_DOT_TYPES)
    from byte so of src . token t's activations (engine.q8_activations' codes x16 and scales xd, xs read as
    flat arrays, token t from group xgroup + t * groups) for t < {n_tok}; head and krow as block_dots'."""
    return dot


_dot1, _dot2, _dot4, _dot8 = (_make_dot(n) for n in (1, 2, 4, 8))


@njit(cache=True, inline="always")
def has_block_dot(qtype: int) -> bool:
    return qtype in BLOCK_DOT_TYPES


@njit(cache=True, inline="always")
def block_dots(qtype: int, n_tok: int, src: np.ndarray, so: int, nblk: int, x16: np.ndarray,
               xd: np.ndarray, xs: np.ndarray, xgroup: int, groups: int, out: np.ndarray, oo: int, ostride: int,
               add: bool, head: int, krow: int) -> int:
    """The dots of nblk blocks of a type in BLOCK_DOT_TYPES from byte so of src with the first n of n_tok tokens
    (n the largest of 8, 4, 2, 1 that fits), written to (or, with add, added to) out[oo + t * ostride];
    returns n. head: the byte offset of the row's header (types with a row scale); krow: the row within its
    interleaved group (its blocks from so hold the whole group's rows)."""
    if n_tok >= 8:
        _dot8(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
        return 8
    if n_tok >= 4:
        _dot4(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
        return 4
    if n_tok >= 2:
        _dot2(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
        return 2
    _dot1(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
    return 1
