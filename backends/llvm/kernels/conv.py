"""conv2d forward, grad_input and grad_filter kernels (NHWC activations, HWIO filters) as implicit GEMMs
on the microkernel of matmul.py — no im2col buffer is ever materialized.

    forward      rows = output pixels,     cols = filters,        k = (kh, kw, c)  -> one store per tile
    grad_input   rows = output pixels,     cols = (kw, c) per kh, k = filters      -> col2im by adding each
                 tile into the (padded) input gradient: every output pixel scatters into its receptive field
    grad_filter  rows = (kh, kw, c),       cols = filters,        k = (oh, ow)     -> summed over images

Zero padding is handled by copying each image into a zero-bordered scratch image (its border is zeroed
once per call), so the inner loops never test bounds; the same trick in reverse (accumulate into a
padded scratch, copy the interior out) serves grad_input.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from llvmlite import ir

from .builder import KernelBuilder, check_activation
from .matmul import (MAX_TILE_ROWS, Epilogue, EpilogueOperands, ReductionLevel, TilePlan, check_packing, column_blocks,
                     emit_tile, finish_pack, for_row_tiles, gemm_builder, pack_b, packed_block, packed_floats, plan_tile,
                     tile_fits, vector_registers)


@dataclass(frozen=True)
class ConvGeometry:
    """All compile-time sizes of one conv2d (per image)."""
    h: int
    w: int
    c: int
    kh: int
    kw: int
    f: int
    sh: int
    sw: int
    dh: int
    dw: int
    pt: int
    pb: int
    pl: int
    pr: int

    @property
    def hp(self) -> int:
        return self.h + self.pt + self.pb

    @property
    def wp(self) -> int:
        return self.w + self.pl + self.pr

    @property
    def oh(self) -> int:
        return (self.hp - self.dh * (self.kh - 1) - 1) // self.sh + 1

    @property
    def ow(self) -> int:
        return (self.wp - self.dw * (self.kw - 1) - 1) // self.sw + 1

    @property
    def padded(self) -> bool:
        return any((self.pt, self.pb, self.pl, self.pr))

    @property
    def pixels(self) -> int:
        return self.oh * self.ow

    @property
    def taps(self) -> int:
        """Reduction length of the forward GEMM."""
        return self.kh * self.kw * self.c


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) and e >= minimum for e in v)):
        raise ValueError(f"{name} must be a pair of ints >= {minimum}, got {v!r}")
    return int(v[0]), int(v[1])


def conv_geometry(in_hwc, kernel_hw, filters, stride, padding, dilation) -> ConvGeometry:
    """Validate conv2d attributes and return the geometry (ValueError naming the bad argument)."""
    if (not isinstance(in_hwc, (tuple, list)) or len(in_hwc) != 3
            or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in in_hwc)):
        raise ValueError(f"in_hwc must be (H, W, C) positive ints, got {in_hwc!r}")
    kh, kw = _pair("kernel_hw", kernel_hw, 1)
    if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
        raise ValueError(f"filters must be a positive int, got {filters!r}")
    sh, sw = _pair("stride", stride, 1)
    dh, dw = _pair("dilation", dilation, 1)
    if not isinstance(padding, (tuple, list)) or len(padding) != 2:
        raise ValueError(f"padding must be ((top, bottom), (left, right)), got {padding!r}")
    pt, pb = _pair("padding[0] (top, bottom)", padding[0], 0)
    pl, pr = _pair("padding[1] (left, right)", padding[1], 0)
    g = ConvGeometry(in_hwc[0], in_hwc[1], in_hwc[2], kh, kw, filters, sh, sw, dh, dw, pt, pb, pl, pr)
    if g.oh < 1 or g.ow < 1:
        raise ValueError(f"conv2d output would be empty: input {tuple(in_hwc)} padded to "
                         f"({g.hp}, {g.wp}) is smaller than the dilated kernel "
                         f"({dh * (kh - 1) + 1}, {dw * (kw - 1) + 1})")
    return g


def _tap_loops(g: ConvGeometry, nr: int) -> list[ReductionLevel]:
    """Reduction nest over (kh, kw, c) for A = a padded image (row stride wp*c) and B = packed filters
    (nr floats per k). simplify_loops merges (kw, c) into one contiguous run when dw == 1."""
    return [ReductionLevel(g.kh, g.dh * g.wp * g.c, g.kw * g.c * nr),
            ReductionLevel(g.kw, g.dw * g.c, g.c * nr),
            ReductionLevel(g.c, 1, nr)]


def _pixel_offset(kb: KernelBuilder, g: ConvGeometry, p):
    """Offset (floats) in the padded input of output pixel p's receptive-field origin."""
    if isinstance(p, int):
        oh, ow = divmod(p, g.ow)
        return (oh * g.sh * g.wp + ow * g.sw) * g.c
    oh = kb.b.udiv(p, kb.i64(g.ow))
    ow = kb.b.sub(p, kb.b.mul(oh, kb.i64(g.ow)))
    return kb.mul(kb.add(kb.mul(oh, g.sh * g.wp), kb.mul(ow, g.sw)), g.c)


def _copy_into_padded(kb: KernelBuilder, g: ConvGeometry, dst_padded, src_image) -> None:
    with kb.for_range(g.h, name="pad.copy") as lr:
        kb.memcpy(kb.gep(dst_padded, kb.mul(kb.add(kb.mul(lr.index, g.wp), g.pt * g.wp + g.pl), g.c)),
                  kb.gep(src_image, kb.mul(lr.index, g.w * g.c)), g.w * g.c)


def _image_source(kb: KernelBuilder, g: ConvGeometry, x, i, xp):
    """Image i of x as the conv reads it: copied into the zero-bordered scratch xp when padded."""
    x_img = kb.gep(x, kb.mul(i, g.h * g.w * g.c))
    if xp is None:
        return x_img
    _copy_into_padded(kb, g, xp, x_img)
    return xp


def _copy_from_padded(kb: KernelBuilder, g: ConvGeometry, dst_image, src_padded) -> None:
    with kb.for_range(g.h, name="unpad.copy") as lr:
        kb.memcpy(kb.gep(dst_image, kb.mul(lr.index, g.w * g.c)),
                  kb.gep(src_padded, kb.mul(kb.add(kb.mul(lr.index, g.wp), g.pt * g.wp + g.pl), g.c)), g.w * g.c)


def _apply_positive_mask(kb: KernelBuilder, data, y, count: int) -> None:
    """data[i] *= (y[i] > 0) for i < count, vectorized with a masked tail."""
    lanes = kb.lanes
    full, rem = divmod(count, lanes)
    mask = Epilogue.of(positive_mask=True)

    if full:
        with kb.for_range(full, name="mask") as lv:
            ptr = kb.gep(data, kb.mul(lv.index, lanes))
            mask.emit(kb, [[kb.load_vec(ptr)]], [ptr], lanes,
                      EpilogueOperands(mask_rows=[kb.gep(y, kb.mul(lv.index, lanes))]))
    if rem:
        ptr = kb.gep(data, full * lanes)
        mask.emit(kb, [[kb.load_part(ptr, 0, rem)]], [ptr], rem,
                  EpilogueOperands(mask_rows=[kb.gep(y, full * lanes)]))


def _for_part_row_tiles(kb: KernelBuilder, rows: int, mr: int, part, parts, body) -> None:
    """for_row_tiles(rows, mr) restricted to part `part` of `parts`: the full tiles
    [full * part / parts, full * (part + 1) / parts), and the static remainder tile on the last part — the
    same tiles as the unsplit loop, only distributed."""
    full, rem = divmod(rows, mr)
    b = kb.b
    if full:
        t0 = b.udiv(b.mul(kb.i64(full), part), parts)
        t1 = b.udiv(b.mul(kb.i64(full), b.add(part, kb.i64(1))), parts)
        with kb.for_range(b.sub(t1, t0), name="rows") as loop:
            body(kb.mul(b.add(t0, loop.index), mr), mr)
    if rem:
        with kb.if_then(b.icmp_unsigned("==", part, b.sub(parts, kb.i64(1)))):
            body(full * mr, rem)


@dataclass(frozen=True)
class PooledRows:
    """conv2d_max_pool's row mapping: output pixel r (of OH//ph x OW//pw) is the window of conv pixels
    (oy*ph + dy, ox*pw + dx), dy, dx in row-major order (max_pool2d's tap order), so a tile of q output
    pixels holds q * window conv pixel rows; the tile height is a whole number of windows."""
    g: ConvGeometry
    ph: int
    pw: int

    @property
    def window(self) -> int:
        return self.ph * self.pw

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.g.oh // self.ph, self.g.ow // self.pw

    @property
    def rows(self) -> int:
        oh, ow = self.out_hw
        return oh * ow

    def __post_init__(self):
        if self.window > MAX_TILE_ROWS:
            raise ValueError(f"conv2d pool window {(self.ph, self.pw)} has more than {MAX_TILE_ROWS} pixels "
                             f"(one register tile)")
        if min(self.out_hw) < 1:
            raise ValueError(f"conv2d pool window {(self.ph, self.pw)} is larger than the conv output "
                             f"{(self.g.oh, self.g.ow)}")

    def plan(self, target, plan: TilePlan | None = None):
        """(tile plan, column blocks) whose row tiles are whole windows and fit the registers; a block's
        mr counts conv pixel rows (a multiple of the window)."""
        regs = vector_registers(target)
        plan = plan or plan_tile(self.rows * self.window, self.g.f, target, self.g.taps)
        nv = plan.nv
        while nv > 1 and not tile_fits(self.window, nv, regs):
            nv -= 1
        plan = TilePlan(max(self.window, plan.mr // self.window * self.window), nv)
        blocks = column_blocks(self.rows * self.window, self.g.f, plan, target, self.g.taps)
        return plan, [replace(b, mr=max(self.window, b.mr // self.window * self.window)) for b in blocks]

    def conv_pixels(self, kb: KernelBuilder, r0, count: int) -> list:
        """Flat conv pixel indices (oh * OW + ow) of the windows of output pixels r0 .. r0 + count - 1."""
        out_w = self.out_hw[1]
        pixels = []
        for t in range(count):
            r = kb.add(r0, t)
            if isinstance(r, int):
                oy, ox = divmod(r, out_w)
            else:
                oy = kb.b.udiv(r, kb.i64(out_w))
                ox = kb.b.sub(r, kb.b.mul(oy, kb.i64(out_w)))
            for dy in range(self.ph):
                for dx in range(self.pw):
                    pixels.append(kb.add(kb.mul(kb.add(kb.mul(oy, self.ph), dy), self.g.ow),
                                         kb.add(kb.mul(ox, self.pw), dx)))
        return pixels


def build_conv2d(module: ir.Module, name: str, *, in_hwc, kernel_hw, filters, stride=(1, 1),
                 padding=((0, 0), (0, 0)), dilation=(1, 1), has_bias: bool = False, has_residual: bool = False,
                 activation: str = "linear", activation_params: tuple = (), target, plan: TilePlan | None = None,
                 loop_order: str = "cols", split_rows: bool = False, packing: str = "per_call",
                 pool: tuple | None = None) -> ir.Function:
    """void name(ptr x, ptr w, ptr b, ptr residual, ptr out, ptr scratch, [i64 part, i64 parts,] i64 n):
    out (n, OH, OW, F) = activation(conv2d(x (n, H, W, C), w (KH, KW, C, F)) + b + residual), bias,
    residual (laid out like out) and activation fused into the tile epilogue. `b` / `residual` are not
    read when has_bias / has_residual is False (may be null).
    loop_order "cols": filter blocks outer, pixel tiles inner (a filter block stays in L1);
    "rows": pixel tiles outer.
    split_rows: the kernel computes only part `part` of `parts` of every image's output pixels (whole row
    tiles, so each output element runs the same tile code and reduction order as in the unsplit kernel:
    bit-identical); each part packs the filters and pads the image into its own scratch.
    packing (matmul.PACKINGS): "per_call" packs w into scratch on every call; "pack_only" builds the
    weight-packing function of this kernel (it writes the packed filters to `out` and returns;
    fn.packed_bytes says how many); "prepacked" reads `w` as that packed buffer.
    pool (ph, pw): conv2d_max_pool — out is (n, OH // ph, OW // pw, F), the maximum of each non-overlapping
    window of the activated conv output, taken in the tile's registers (PooledRows); the conv output is
    never stored."""
    check_packing(packing)
    g = conv_geometry(in_hwc, kernel_hw, filters, stride, padding, dilation)
    pooled = PooledRows(g, *_pair("pool", pool, 1)) if pool is not None else None
    activation, activation_params = check_activation(activation, activation_params)
    if loop_order not in ("cols", "rows"):
        raise ValueError(f"loop_order must be 'cols' or 'rows', got {loop_order!r}")
    if not isinstance(has_residual, bool) or not isinstance(has_bias, bool):
        raise TypeError(f"conv2d: has_bias and has_residual must be bools, got {has_bias!r}, {has_residual!r}")
    kb = gemm_builder(module, name, 5, target, ("part", "parts") if split_rows else ())
    x, w, bias, residual, out = kb.args
    n = kb.n
    lanes = kb.lanes
    if pooled is not None:
        plan, blocks = pooled.plan(target, plan)
    else:
        plan = plan or plan_tile(g.pixels, g.f, target, g.taps)
        blocks = column_blocks(g.pixels, g.f, plan, target, g.taps)
    k = g.taps
    if packing == "per_call":
        packed = kb.scratch(k * packed_floats(blocks, lanes))
    else:
        packed = out if packing == "pack_only" else w
    if packing == "pack_only":
        pack_b(kb, w, k, g.f, 1, blocks, packed)
        return finish_pack(kb, 4 * k * packed_floats(blocks, lanes))
    xp = kb.scratch(g.hp * g.wp * g.c) if g.padded else None
    if packing == "per_call":
        pack_b(kb, w, k, g.f, 1, blocks, packed)
    if xp is not None:
        kb.memset_zero(xp, g.hp * g.wp * g.c)
    epilogue = Epilogue.of(bias=has_bias, residual=has_residual, activation=activation,
                           activation_params=activation_params, window=pooled.window if pooled else 1)
    rows = pooled.rows if pooled else g.pixels          # what a tile row counts: output pixels

    with kb.for_range(n, name="image") as li:
        i = li.index
        src = _image_source(kb, g, x, i, xp)
        out_img = kb.gep(out, kb.mul(i, rows * g.f))
        res_img = kb.gep(residual, kb.mul(i, g.pixels * g.f)) if has_residual else None

        def tile(r0, mr, which, j):
            blk = blocks[which]
            nr = blk.nv * lanes
            col0 = kb.add(blk.start, kb.mul(j, nr))
            # the conv pixels of the tile's rows: mr output pixels, or mr windows of pooled.window pixels
            pixels = pooled.conv_pixels(kb, r0, mr) if pooled else [kb.add(r0, m) for m in range(mr)]
            a_rows = [kb.gep(src, _pixel_offset(kb, g, p)) for p in pixels]
            acc = emit_tile(kb, a_rows, packed_block(kb, packed, k, blocks, which, j), _tap_loops(g, nr),
                            blk.nv, nr)
            out_rows = [kb.gep(out_img, kb.add(kb.mul(kb.add(r0, m), g.f), col0)) for m in range(mr)]
            res_rows = ([kb.gep(res_img, kb.add(kb.mul(p, g.f), col0)) for p in pixels]
                        if has_residual else None)
            epilogue.emit(kb, acc, out_rows, blk.width,
                          EpilogueOperands(bias=kb.gep(bias, col0) if has_bias else None, residual_rows=res_rows))

        for which, blk in enumerate(blocks):
            per_tile = blk.mr // pooled.window if pooled else blk.mr      # output pixels per row tile
            if split_rows:
                with kb.for_range(blk.count, name="cols") as lj:
                    _for_part_row_tiles(kb, rows, per_tile, *kb.int_args,
                                        lambda r0, mr, which=which, j=lj.index: tile(r0, mr, which, j))
            elif loop_order == "cols":
                with kb.for_range(blk.count, name="cols") as lj:
                    for_row_tiles(kb, rows, per_tile, lambda r0, mr, which=which, j=lj.index:
                                  tile(r0, mr, which, j))
            else:
                def row_tile(r0, mr, which=which, blk=blk):
                    with kb.for_range(blk.count, name="cols") as lj:
                        tile(r0, mr, which, lj.index)
                for_row_tiles(kb, rows, per_tile, row_tile)
    return kb.finish()


def build_conv2d_grad_input(module: ir.Module, name: str, *, in_hwc, kernel_hw, filters, stride=(1, 1),
                            padding=((0, 0), (0, 0)), dilation=(1, 1), target,
                            output_mask: bool = False, plan: TilePlan | None = None) -> ir.Function:
    """void name(ptr dy, ptr w, [ptr y,] ptr out, i64 n): out (n, H, W, C) = d conv2d / d x applied to
    dy (n, OH, OW, F). With output_mask, out *= (y > 0) for y shaped like out (a fused relu_grad)."""
    g = conv_geometry(in_hwc, kernel_hw, filters, stride, padding, dilation)
    kb = gemm_builder(module, name, 3 + bool(output_mask), target)
    dy, w = kb.args[:2]
    y = kb.args[2] if output_mask else None
    out, n = kb.args[-1], kb.n
    lanes = kb.lanes
    # Column groups: runs of the receptive field that are contiguous in the input image.
    if g.dw == 1:
        ngroups, group_width = g.kh, g.kw * g.c
    else:
        ngroups, group_width = g.kh * g.kw, g.c
    plan = plan or plan_tile(g.pixels, group_width, target, g.f)
    blocks = column_blocks(g.pixels, group_width, plan, target, g.f)
    group_floats = g.f * packed_floats(blocks, lanes)
    packed = kb.scratch(ngroups * group_floats)
    image_floats = g.hp * g.wp * g.c
    dxp = kb.scratch(image_floats) if g.padded else None
    for grp in range(ngroups):
        # B[k=f, col] = w[(grp*group_width + col)*F + f]
        pack_b(kb, kb.gep(w, grp * group_width * g.f), g.f, 1, g.f, blocks, kb.gep(packed, grp * group_floats))

    def group_offset(grp):
        """Offset in the padded input of a column group relative to a receptive-field origin."""
        if g.dw == 1:
            return kb.mul(grp, g.dh * g.wp * g.c)
        kh = kb.b.udiv(grp, kb.i64(g.kw))
        kw = kb.b.sub(grp, kb.b.mul(kh, kb.i64(g.kw)))
        return kb.mul(kb.add(kb.mul(kh, g.dh * g.wp), kb.mul(kw, g.dw)), g.c)

    accumulate = Epilogue(accumulate=True)

    with kb.for_range(n, name="image") as li:
        i = li.index
        out_img = kb.gep(out, kb.mul(i, g.h * g.w * g.c))
        dst = dxp if dxp is not None else out_img
        kb.memset_zero(dst, image_floats)
        dy_img = kb.gep(dy, kb.mul(i, g.pixels * g.f))

        for which, blk in enumerate(blocks):
            nr = blk.nv * lanes

            def row_tile(r0, mr, which=which, blk=blk, nr=nr):
                a_rows = [kb.gep(dy_img, kb.mul(kb.add(r0, m), g.f)) for m in range(mr)]
                origins = [_pixel_offset(kb, g, kb.add(r0, m)) for m in range(mr)]

                with kb.for_range(ngroups, name="groups") as lg:
                    goff = group_offset(lg.index)
                    gpacked = kb.gep(packed, kb.mul(lg.index, group_floats))
                    with kb.for_range(blk.count, name="cols") as lj:
                        col0 = kb.add(blk.start, kb.mul(lj.index, nr))
                        acc = emit_tile(kb, a_rows, packed_block(kb, gpacked, g.f, blocks, which, lj.index),
                                        [ReductionLevel(g.f, 1, nr)], blk.nv, nr)
                        out_rows = [kb.gep(dst, kb.add(kb.add(o, goff), col0)) for o in origins]
                        accumulate.emit(kb, acc, out_rows, blk.width)
            for_row_tiles(kb, g.pixels, blk.mr, row_tile)
        if dxp is not None:
            _copy_from_padded(kb, g, out_img, dxp)
        if y is not None:
            _apply_positive_mask(kb, out_img, kb.gep(y, kb.mul(i, g.h * g.w * g.c)), g.h * g.w * g.c)
    return kb.finish()


def build_conv2d_grad_filter(module: ir.Module, name: str, *, in_hwc, kernel_hw, filters, stride=(1, 1),
                             padding=((0, 0), (0, 0)), dilation=(1, 1), target,
                             plan: TilePlan | None = None) -> ir.Function:
    """void name(ptr x, ptr dy, ptr out, i64 n): out (KH, KW, C, F) = sum over the n images of
    d conv2d / d w (overwritten, not accumulated into; zeros when n == 0)."""
    g = conv_geometry(in_hwc, kernel_hw, filters, stride, padding, dilation)
    kb = gemm_builder(module, name, 3, target)
    x, dy, out = kb.args
    n = kb.n
    lanes = kb.lanes
    rows = g.taps
    plan = plan or plan_tile(rows, g.f, target, g.pixels)
    blocks = column_blocks(rows, g.f, plan, target, g.pixels)
    xp = kb.scratch(g.hp * g.wp * g.c) if g.padded else None
    kb.memset_zero(out, rows * g.f)
    if xp is not None:
        kb.memset_zero(xp, g.hp * g.wp * g.c)
    accumulate = Epilogue(accumulate=True)
    # k = (oh, ow): A walks the image with the stride, B walks dy's pixels.
    loops_for = lambda: [ReductionLevel(g.oh, g.sh * g.wp * g.c, g.ow * g.f), ReductionLevel(g.ow, g.sw * g.c, g.f)]

    def tap_offset(m):
        """Offset in the padded image of filter row m = (kh, kw, c)."""
        if isinstance(m, int):
            kh, rest = divmod(m, g.kw * g.c)
            kw, c = divmod(rest, g.c)
            return (kh * g.dh * g.wp + kw * g.dw) * g.c + c
        kh = kb.b.udiv(m, kb.i64(g.kw * g.c))
        rest = kb.b.sub(m, kb.b.mul(kh, kb.i64(g.kw * g.c)))
        if g.dw == 1:
            return kb.add(kb.mul(kh, g.dh * g.wp * g.c), rest)
        kw = kb.b.udiv(rest, kb.i64(g.c))
        c = kb.b.sub(rest, kb.b.mul(kw, kb.i64(g.c)))
        return kb.add(kb.mul(kb.add(kb.mul(kh, g.dh * g.wp), kb.mul(kw, g.dw)), g.c), c)

    with kb.for_range(n, name="image") as li:
        i = li.index
        src = _image_source(kb, g, x, i, xp)
        dy_img = kb.gep(dy, kb.mul(i, g.pixels * g.f))
        for blk in blocks:
            nr = blk.nv * lanes

            def row_tile(r0, mr, blk=blk, nr=nr):
                a_rows = [kb.gep(src, tap_offset(kb.add(r0, m))) for m in range(mr)]

                with kb.for_range(blk.count, name="cols") as lj:
                    col0 = kb.add(blk.start, kb.mul(lj.index, nr))
                    acc = emit_tile(kb, a_rows, kb.gep(dy_img, col0), loops_for(), blk.nv, blk.width)
                    out_rows = [kb.gep(out, kb.add(kb.mul(kb.add(r0, m), g.f), col0)) for m in range(mr)]
                    accumulate.emit(kb, acc, out_rows, blk.width)
            for_row_tiles(kb, rows, blk.mr, row_tile)
    return kb.finish()
