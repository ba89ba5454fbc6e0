"""The format table and its layout arithmetic, for every format primed knows."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from primed import formats
from primed.formats import FORMATS, PITCH_ALIGN, Format, LayoutError, Limits

ALL = sorted(FORMATS.values(), key=lambda f: f.code)
SUBSAMPLED = [f for f in ALL if f.hsub > 1 or f.vsub > 1]
DEFAULT = Limits()


def rows(fmt: Format, plane: int, height: int) -> int:
    return height if plane == 0 else -(-height // fmt.vsub)


def row_bytes(fmt: Format, plane: int, width: int) -> int:
    """The bytes one row of ``plane`` really holds (a chroma row is ``width / hsub`` samples)."""
    return width * fmt.cpp[0] if plane == 0 else width // fmt.hsub * fmt.cpp[plane]


@st.composite
def sizes(draw: st.DrawFn, fmt: Format, limits: Limits = DEFAULT) -> tuple[int, int]:
    """A width and height within ``limits`` that ``fmt``'s subsampling allows."""
    width = fmt.hsub * draw(st.integers(1, limits.max_width // fmt.hsub))
    height = fmt.vsub * draw(st.integers(1, limits.max_height // fmt.vsub))
    return width, height


def test_table_is_consistent() -> None:
    assert len(ALL) == len(FORMATS) == len({f.name for f in ALL})
    for fmt in ALL:
        assert FORMATS[fmt.fourcc] is fmt
        assert 1 <= fmt.planes <= formats.MAX_PLANES
        assert fmt.hsub in (1, 2) and fmt.vsub in (1, 2)
        if fmt.planes == 1 and fmt.hsub == 1:
            assert fmt.vsub == 1


@pytest.mark.parametrize("fmt", ALL, ids=[f.code for f in ALL])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_layout_properties(fmt: Format, data: st.DataObject) -> None:
    width, height = data.draw(sizes(fmt))
    lay = formats.layout(fmt, width, height)
    assert len(lay.planes) == fmt.planes
    pitch0 = lay.planes[0].pitch
    assert pitch0 % PITCH_ALIGN == 0
    assert pitch0 - PITCH_ALIGN < width * fmt.cpp[0] <= pitch0
    end = 0
    for index, plane in enumerate(lay.planes):
        assert plane.offset == end, f"plane {index} does not start where plane {index - 1} ends"
        assert plane.pitch >= row_bytes(fmt, index, width)
        if index:
            # A chroma pitch is plane 0's scaled by bytes per sample and subsampling.
            assert plane.pitch * fmt.cpp[0] * fmt.hsub == pitch0 * fmt.cpp[index]
        end = plane.offset + plane.pitch * rows(fmt, index, height)
    assert lay.size == end
    assert formats.plan(fmt, width, height, DEFAULT) == lay


@pytest.mark.parametrize("fmt", ALL, ids=[f.code for f in ALL])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_layout_on_a_given_pitch(fmt: Format, data: st.DataObject) -> None:
    # The DRM backend lays planes out on the kernel's pitch: any pitch at least a
    # row long that divides among the chroma planes must give disjoint planes.
    width, height = data.draw(sizes(fmt, Limits(4096, 4096)))
    row = width * fmt.cpp[0]
    pitch0 = data.draw(st.integers(row, row + 512))
    try:
        lay = formats.layout(fmt, width, height, pitch0=pitch0)
    except LayoutError:
        assert any(pitch0 * c % (fmt.cpp[0] * fmt.hsub) for c in fmt.cpp[1:])
        return
    spans = sorted(
        (p.offset, p.offset + p.pitch * rows(fmt, i, height)) for i, p in enumerate(lay.planes)
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert lay.planes[0].pitch == pitch0
    assert all(p.pitch >= row_bytes(fmt, i, width) for i, p in enumerate(lay.planes))
    assert lay.size == spans[-1][1]


def test_pitch_shorter_than_a_row_is_refused() -> None:
    with pytest.raises(LayoutError, match="shorter than a row"):
        formats.layout(formats.lookup("XR24"), 100, 10, pitch0=399)


def test_pitch_that_cannot_be_halved_is_refused() -> None:
    with pytest.raises(LayoutError, match="cannot be split"):
        formats.layout(formats.lookup("YU12"), 64, 64, pitch0=65)


def test_known_layouts() -> None:
    nv12 = formats.layout(formats.lookup("NV12"), 1920, 1080)
    assert [(p.offset, p.pitch) for p in nv12.planes] == [(0, 1920), (1920 * 1080, 1920)]
    assert nv12.size == 1920 * 1080 * 3 // 2
    yu12 = formats.layout(formats.lookup("YU12"), 640, 480)
    assert [(p.offset, p.pitch) for p in yu12.planes] == [
        (0, 640),
        (640 * 480, 320),
        (640 * 480 + 320 * 240, 320),
    ]
    p010 = formats.layout(formats.lookup("P010"), 64, 32)
    assert [(p.offset, p.pitch) for p in p010.planes] == [(0, 128), (128 * 32, 128)]
    yuyv = formats.layout(formats.lookup("YUYV"), 6, 1)
    assert [(p.offset, p.pitch) for p in yuyv.planes] == [(0, 64)]


@pytest.mark.parametrize("fmt", ALL, ids=[f.code for f in ALL])
@pytest.mark.parametrize(
    ("width", "height"), [(0, 16), (16, 0), (0, 0), (-2, 16), (16, -2)], ids=str
)
def test_plan_refuses_empty_sizes(fmt: Format, width: int, height: int) -> None:
    with pytest.raises(LayoutError) as refused:
        formats.plan(fmt, width, height, DEFAULT)
    assert not refused.value.limit


@pytest.mark.parametrize("fmt", ALL, ids=[f.code for f in ALL])
def test_plan_refuses_sides_over_the_limit(fmt: Format) -> None:
    limits = Limits(max_width=256, max_height=128)
    assert formats.plan(fmt, 256, 128, limits).size > 0
    for width, height in ((258, 128), (256, 130), (1 << 20, 2)):
        with pytest.raises(LayoutError, match="exceeds the limit") as refused:
            formats.plan(fmt, width, height, limits)
        assert refused.value.limit


@pytest.mark.parametrize("fmt", SUBSAMPLED, ids=[f.code for f in SUBSAMPLED])
def test_plan_refuses_sizes_the_subsampling_splits(fmt: Format) -> None:
    odd = []
    if fmt.hsub > 1:
        odd.append((63, 64))
    if fmt.vsub > 1:
        odd.append((64, 63))
    assert odd
    for width, height in odd:
        with pytest.raises(LayoutError, match="divisible") as refused:
            formats.plan(fmt, width, height, DEFAULT)
        assert not refused.value.limit
    formats.plan(fmt, 64, 64, DEFAULT)


def test_odd_sizes_allowed_without_subsampling() -> None:
    for fmt in ALL:
        if fmt.hsub == 1 and fmt.vsub == 1:
            assert formats.plan(fmt, 63, 63, DEFAULT).size > 0


def test_plan_holds_the_size_limit() -> None:
    xr24 = formats.lookup("XR24")
    # 16K x 16K of a 4-byte format is exactly the default 1 GiB.
    assert formats.plan(xr24, 16384, 16384, DEFAULT).size == DEFAULT.max_size == 1 << 30
    wider = Limits(max_width=16385)
    with pytest.raises(LayoutError, match="over the limit") as refused:
        formats.plan(xr24, 16385, 16384, wider)
    assert refused.value.limit
    roomy = Limits(max_width=16385, max_size=2 << 30)
    assert formats.plan(xr24, 16385, 16384, roomy).size > 1 << 30
    with pytest.raises(LayoutError, match="over the limit"):
        formats.plan(xr24, 64, 64, Limits(max_size=64 * 64 * 4 - 1))
    assert formats.plan(xr24, 64, 64, Limits(max_size=64 * 64 * 4)).size == 64 * 64 * 4


@pytest.mark.parametrize("fmt", ALL, ids=[f.code for f in ALL])
def test_lookup_by_text_name_and_integer(fmt: Format) -> None:
    assert formats.lookup(fmt.code) is fmt
    assert formats.lookup(fmt.code.lower()) is fmt
    assert formats.lookup(f" {fmt.code} ") is fmt
    assert formats.lookup(fmt.name) is fmt
    assert formats.lookup(fmt.name.lower()) is fmt
    assert formats.lookup(fmt.fourcc) is fmt


@pytest.mark.parametrize("spec", ["ZZZZ", "", "XRGB", "nv13", formats.fourcc("ZZZZ"), 0])
def test_lookup_refuses_unknown_formats(spec: str | int) -> None:
    with pytest.raises(ValueError, match="unsupported format"):
        formats.lookup(spec)


def test_fourcc_matches_drm_fourcc_h() -> None:
    # fourcc_code('X', 'R', '2', '4') and fourcc_code('R', '8', ' ', ' ').
    assert formats.fourcc("XR24") == 0x34325258
    assert formats.fourcc("NV12") == 0x3231564E
    assert formats.fourcc("R8") == 0x20203852
    assert formats.fourcc_str(0x34325258) == "XR24"


@pytest.mark.parametrize("fmt", ALL, ids=[f.code for f in ALL])
def test_fourcc_round_trip(fmt: Format) -> None:
    assert formats.fourcc_str(formats.fourcc(fmt.code)) == fmt.code
    assert formats.fourcc(formats.fourcc_str(fmt.fourcc)) == fmt.fourcc


@given(st.integers(0, 0xFFFFFFFF))
def test_fourcc_str_of_any_integer(value: int) -> None:
    text = formats.fourcc_str(value)
    assert len(text) <= 4
    assert all(32 <= ord(c) < 127 for c in text)
    if all(33 <= b < 127 for b in value.to_bytes(4, "little")):
        assert formats.fourcc(text) == value


@pytest.mark.parametrize("code", ["XRGB8", "ABCDE", "é"])
def test_fourcc_refuses_other_lengths(code: str) -> None:
    with pytest.raises(ValueError):
        formats.fourcc(code)
