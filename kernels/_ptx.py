"""PTX instructions numba-cuda does not expose, as Numba intrinsics (inline asm), with Python
stand-ins of the same meaning for the simulator.

    ld4(a, i)           a[i], a[i+1], a[i+2], a[i+3] in one 16-byte load (ld.global.nc.v4; i % 4 == 0,
                        the array 16-byte aligned); a is a 1-D uint32 or float32 array
    st4(a, i, v0..v3)   the matching 16-byte store (st.global.v4.b32) into a uint32 array
    half2(lo, hi)       two float32 -> one uint32 holding two fp16 (cvt.rn.f16x2.f32; lo in bits 0..15)
    dp4a(a, b, c)       c + sum of the four signed-byte products of a and b (dp4a.s32.s32)
    f16lo(u), f16hi(u)  the fp16 in bits 0..15 / 16..31 of a uint32, as float32 (cvt.f32.f16)
    fshr(lo, hi, s)     bits s..s+31 of the 64-bit hi:lo, s < 32 (shf.r.wrap)
    load16(w32, off)    16 bytes at an even byte offset, as 4 words, without a branch
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import cuda, types
from numba.cuda import cgutils
from numba.cuda.extending import intrinsic

from ._device import SIMULATOR, I, U


def _pointer(context, builder, aryty, ary, idx):
    arr = context.make_array(aryty)(context, builder, value=ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, [idx], wraparound=False)


@intrinsic
def _ld4(typingctx, a, i):
    elem = a.dtype
    sig = types.UniTuple(elem, 4)(a, i)
    suffix, con = ("f32", "f") if isinstance(elem, types.Float) else ("u32", "r")

    def codegen(context, builder, sig, args):
        lty = context.get_value_type(elem)
        fnty = ir.FunctionType(ir.LiteralStructType([lty] * 4), [lty.as_pointer()])
        asm = ir.InlineAsm(fnty, f"ld.global.nc.v4.{suffix} {{$0, $1, $2, $3}}, [$4];", f"={con},={con},={con},={con},l")
        res = builder.call(asm, [_pointer(context, builder, sig.args[0], args[0], args[1])])
        return context.make_tuple(builder, sig.return_type, [builder.extract_value(res, k) for k in range(4)])

    return sig, codegen


@intrinsic
def _st4(typingctx, a, i, v0, v1, v2, v3):
    sig = types.void(a, i, types.uint32, types.uint32, types.uint32, types.uint32)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i32.as_pointer(), i32, i32, i32, i32])
        asm = ir.InlineAsm(fnty, "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r", side_effect=True)
        vals = [context.cast(builder, v, t, types.uint32) for v, t in zip(args[2:], sig.args[2:])]
        builder.call(asm, [_pointer(context, builder, sig.args[0], args[0], args[1])] + vals)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _half2(typingctx, lo, hi):
    sig = types.uint32(types.float32, types.float32)

    def codegen(context, builder, sig, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        asm = ir.InlineAsm(ir.FunctionType(i32, [f32, f32]), "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f")
        return builder.call(asm, [args[1], args[0]])   # first source goes to the upper half

    return sig, codegen


@intrinsic
def _dp4a(typingctx, a, b, c):
    sig = types.int32(types.uint32, types.uint32, types.int32)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r")
        return builder.call(asm, list(args))

    return sig, codegen


@intrinsic
def _fshr(typingctx, lo, hi, s):
    sig = types.uint32(types.uint32, types.uint32, types.uint32)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "shf.r.wrap.b32 $0, $1, $2, $3;", "=r,r,r,r")
        return builder.call(asm, list(args))

    return sig, codegen


def _f16_half(upper):
    @intrinsic
    def impl(typingctx, u):
        sig = types.float32(types.uint32)

        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.FloatType(), [ir.IntType(32)])
            pick = "{.reg .b16 l, h; mov.b32 {l, h}, $1; cvt.f32.f16 $0, %s;}" % ("h" if upper else "l")
            return builder.call(ir.InlineAsm(fnty, pick, "=f,r"), [args[0]])

        return sig, codegen

    return impl


if SIMULATOR:

    @cuda.jit(device=True)
    def ld4(a, i):
        return a[i], a[i + 1], a[i + 2], a[i + 3]

    @cuda.jit(device=True)
    def st4(a, i, v0, v1, v2, v3):
        a[i], a[i + 1], a[i + 2], a[i + 3] = v0, v1, v2, v3

    @cuda.jit(device=True)
    def half2(lo, hi):
        h = np.array([lo, hi], np.float32).astype(np.float16).view(np.uint16)
        return np.uint32(h[0]) | (np.uint32(h[1]) << np.uint32(16))

    @cuda.jit(device=True)
    def dp4a(a, b, c):
        sa = np.array([a], np.uint32).view(np.int8).astype(np.int32)
        sb = np.array([b], np.uint32).view(np.int8).astype(np.int32)
        return np.int32(c + int((sa * sb).sum()))

    @cuda.jit(device=True)
    def fshr(lo, hi, s):
        return np.uint32(((int(hi) << 32 | int(lo)) >> int(s)) & 0xFFFFFFFF)

    @cuda.jit(device=True)
    def f16lo(u):
        return np.float32(np.uint16(u & np.uint32(0xFFFF)).view(np.float16))

    @cuda.jit(device=True)
    def f16hi(u):
        return np.float32(np.uint16(u >> np.uint32(16)).view(np.float16))

else:
    ld4, st4, half2, dp4a, fshr = _ld4, _st4, _half2, _dp4a, _fshr
    f16lo, f16hi = _f16_half(False), _f16_half(True)


@cuda.jit(device=True, inline=True)
def load16(w32, off):
    """Bytes [off, off+16) as 4 words, ``off`` even: 5 aligned loads joined by funnel shifts,
    no branch (lanes of a warp may disagree on alignment). Reads up to 3 bytes past the field."""
    i = off >> I(2)
    s = U(I(8) * (off & I(2)))
    w0, w1, w2, w3, w4 = w32[i], w32[i + I(1)], w32[i + I(2)], w32[i + I(3)], w32[i + I(4)]
    return fshr(w0, w1, s), fshr(w1, w2, s), fshr(w2, w3, s), fshr(w3, w4, s)
