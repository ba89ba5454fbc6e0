"""DRM pixel formats and how each is laid out in one linear buffer.

Pure arithmetic: no I/O. The daemon checks every request here before it issues
any ioctl, so that what it can reject itself never reaches the kernel.

All planes of a format live in one dumb buffer, one after the other. Plane 0
has pitch ``pitch0``; a chroma plane's pitch is derived from it the way video
APIs expect (``pitch0 * cpp[i] / (cpp[0] * hsub)``: half for YU12's U and V,
equal for NV12's UV), so that a single pitch describes the whole buffer.
"""

from __future__ import annotations

import dataclasses

from primed.errors import LayoutError as LayoutError  # noqa: PLC0414 (re-exported)
from primed.errors import UnknownFormat as UnknownFormat  # noqa: PLC0414 (re-exported)

#: DRM_FORMAT_MOD_LINEAR: the only modifier a dumb buffer can have.
MOD_LINEAR = 0
#: DRM_FORMAT_MOD_INVALID: no modifier given (the driver picks, implicitly), not LINEAR.
MOD_INVALID = 0x00FFFFFFFFFFFFFF
#: The pitch alignment primed uses where it chooses the pitch itself (bytes).
PITCH_ALIGN = 64
#: The most planes a DRM framebuffer can have.
MAX_PLANES = 4


def fourcc(code: str) -> int:
    """The little-endian integer of a four-character code, as drm_fourcc.h's fourcc_code()."""
    raw = code.encode("ascii").ljust(4)
    if len(raw) != 4:
        raise ValueError(f"a fourcc has four characters, not {code!r}")
    return int.from_bytes(raw, "little")


def fourcc_str(value: int) -> str:
    """The four characters of a fourcc integer (non-printable bytes shown as '?')."""
    raw = (value & 0xFFFFFFFF).to_bytes(4, "little")
    return "".join(chr(b) if 32 <= b < 127 else "?" for b in raw).rstrip()


@dataclasses.dataclass(frozen=True, slots=True)
class Format:
    """One pixel format: bytes per pixel of each plane and the chroma subsampling."""

    code: str  #: the fourcc as text, e.g. "NV12"
    name: str  #: drm_fourcc.h's name without DRM_FORMAT_, e.g. "XRGB8888"
    cpp: tuple[int, ...]  #: bytes per pixel (per sample group) of each plane
    hsub: int = 1  #: horizontal subsampling of the chroma planes (and of YUYV's pairs)
    vsub: int = 1  #: vertical subsampling of the chroma planes
    fourcc: int = dataclasses.field(init=False, repr=False, compare=False)  #: of ``code``

    def __post_init__(self) -> None:
        object.__setattr__(self, "fourcc", fourcc(self.code))

    @property
    def planes(self) -> int:
        return len(self.cpp)


_TABLE = (
    Format("XR24", "XRGB8888", (4,)),
    Format("AR24", "ARGB8888", (4,)),
    Format("XB24", "XBGR8888", (4,)),
    Format("AB24", "ABGR8888", (4,)),
    Format("XR30", "XRGB2101010", (4,)),
    Format("AR30", "ARGB2101010", (4,)),
    Format("RG16", "RGB565", (2,)),
    Format("BG16", "BGR565", (2,)),
    Format("RG24", "RGB888", (3,)),
    Format("BG24", "BGR888", (3,)),
    Format("R8", "R8", (1,)),
    Format("R16", "R16", (2,)),
    Format("GR88", "GR88", (2,)),
    Format("YUYV", "YUYV", (2,), hsub=2),
    Format("YVYU", "YVYU", (2,), hsub=2),
    Format("UYVY", "UYVY", (2,), hsub=2),
    Format("VYUY", "VYUY", (2,), hsub=2),
    Format("NV12", "NV12", (1, 2), hsub=2, vsub=2),
    Format("NV21", "NV21", (1, 2), hsub=2, vsub=2),
    Format("NV16", "NV16", (1, 2), hsub=2),
    Format("NV61", "NV61", (1, 2), hsub=2),
    Format("YU12", "YUV420", (1, 1, 1), hsub=2, vsub=2),
    Format("YV12", "YVU420", (1, 1, 1), hsub=2, vsub=2),
    Format("YU16", "YUV422", (1, 1, 1), hsub=2),
    Format("YV16", "YVU422", (1, 1, 1), hsub=2),
    Format("YU24", "YUV444", (1, 1, 1)),
    Format("YV24", "YVU444", (1, 1, 1)),
    Format("P010", "P010", (2, 4), hsub=2, vsub=2),
)

#: Every supported format by its fourcc integer.
FORMATS: dict[int, Format] = {f.fourcc: f for f in _TABLE}
_BY_TEXT = {**{f.code.upper(): f for f in _TABLE}, **{f.name.upper(): f for f in _TABLE}}


def lookup(spec: str | int) -> Format:
    """The format named by a fourcc ("NV12"), a DRM name ("XRGB8888") or a fourcc integer.

    Raises UnknownFormat (a ValueError) for a format primed does not lay out.
    """
    if isinstance(spec, int):
        found = FORMATS.get(spec)
    else:
        found = _BY_TEXT.get(spec.strip().upper())
    if found is None:
        shown = fourcc_str(spec) if isinstance(spec, int) else spec
        raise UnknownFormat(
            f"unsupported format {shown!r}; known: {', '.join(f.code for f in _TABLE)}"
        )
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class Plane:
    """Where one plane of a buffer lies."""

    offset: int  #: bytes from the start of the buffer
    pitch: int  #: bytes from one row to the next


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    planes: tuple[Plane, ...]
    size: int  #: bytes the planes span (the buffer may be larger, e.g. page-rounded)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one allocation may ask for. The defaults suit 16K displays."""

    max_width: int = 16384
    max_height: int = 16384
    max_size: int = 1 << 30  #: bytes per buffer
    max_count: int = 1024  #: buffers per request


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def check(fmt: Format, width: int, height: int, limits: Limits) -> None:
    """Refuse sizes the limits or the format's subsampling do not allow.

    Raises LayoutError.
    """
    if width <= 0 or height <= 0:
        raise LayoutError(f"{width}x{height}: width and height must be at least 1")
    if width > limits.max_width or height > limits.max_height:
        raise LayoutError(
            f"{width}x{height} exceeds the limit of {limits.max_width}x{limits.max_height}",
            limit=True,
        )
    if width % fmt.hsub or height % fmt.vsub:
        raise LayoutError(
            f"{fmt.code} needs a width divisible by {fmt.hsub} and a height divisible by "
            f"{fmt.vsub}, not {width}x{height}"
        )


def layout(fmt: Format, width: int, height: int, pitch0: int | None = None) -> Layout:
    """Where each plane of a ``width`` x ``height`` buffer lies.

    ``pitch0`` is plane 0's pitch; by default the row is rounded up to
    PITCH_ALIGN bytes. Raises LayoutError if ``pitch0`` is too small or cannot
    be divided among the chroma planes. Python integers do not overflow; the
    caller compares ``size`` with its limit before it allocates.
    """
    row0 = width * fmt.cpp[0]
    if pitch0 is None:
        pitch0 = _align(row0, PITCH_ALIGN)
    key = (fmt.fourcc, width, height, pitch0)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0] is fmt:
        return hit[1]
    result = _layout(fmt, width, height, row0, pitch0)
    if len(_LAYOUTS) >= _PLANS_MAX:  # bounded, as plan()'s
        _LAYOUTS.clear()
    _LAYOUTS[key] = (fmt, result)
    return result


#: layout()'s cache (the DRM backends lay out every buffer twice, on pitches that are
#: the same for a size): (fourcc, width, height, pitch0) -> (the format, the layout).
#: A hit must be the same Format object; refusals are not cached.
_LAYOUTS: dict[tuple[int, int, int, int], tuple[Format, Layout]] = {}


def _layout(fmt: Format, width: int, height: int, row0: int, pitch0: int) -> Layout:
    if pitch0 < row0:
        raise LayoutError(f"pitch {pitch0} is shorter than a row of {row0} bytes")
    planes = []
    offset = 0
    for index, cpp in enumerate(fmt.cpp):
        if index == 0:
            pitch, rows = pitch0, height
        else:
            scaled = pitch0 * cpp
            divisor = fmt.cpp[0] * fmt.hsub
            if scaled % divisor:
                raise LayoutError(f"pitch {pitch0} cannot be split among {fmt.code}'s planes")
            pitch, rows = scaled // divisor, -(-height // fmt.vsub)
        planes.append(Plane(offset, pitch))
        offset += pitch * rows
    return Layout(tuple(planes), offset)


#: plan()'s cache: (fourcc, width, height) -> (the format, the limits, the layout).
#: Keyed by ints, whose hash is C's, where Format's and Limits' (frozen dataclasses)
#: are Python calls hashing every field; a hit is the same format and limits objects
#: (``is``: both are immutable), so an equal-but-other Limits just plans again.
_PLANS: dict[tuple[int, int, int], tuple[Format, Limits, Layout]] = {}
_PLANS_MAX = 256


def plan(fmt: Format, width: int, height: int, limits: Limits) -> Layout:
    """check() and layout() with the default pitch, and the size held to ``limits``.

    Results are cached (refusals are not): the daemon plans each request at least
    twice (the core, then the allocator), and clients ask for few distinct sizes.
    """
    key = (fmt.fourcc, width, height)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is fmt and hit[1] is limits:
        return hit[2]
    result = _plan(fmt, width, height, limits)
    if len(_PLANS) >= _PLANS_MAX:  # bounded: a client cycling sizes can't grow it
        _PLANS.clear()
    _PLANS[key] = (fmt, limits, result)
    return result


def _plan(fmt: Format, width: int, height: int, limits: Limits) -> Layout:
    check(fmt, width, height, limits)
    result = layout(fmt, width, height)
    if result.size > limits.max_size:
        raise LayoutError(
            f"{width}x{height} {fmt.code} needs {result.size} bytes, over the limit of "
            f"{limits.max_size}",
            limit=True,
        )
    return result
