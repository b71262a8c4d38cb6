"""Errors the CLI reports as one line with exit code 2 (besides ValueError / OSError / ImportError)."""


class SegRtError(Exception):
    """Base of seg-rt's own errors."""


class ModelLoadError(SegRtError, ValueError):
    """A model folder or hub id that cannot be loaded."""


class EnvironmentUnavailable(SegRtError, RuntimeError):
    """What this machine lacks: a GPU, an ONNX Runtime provider, a working TensorRT."""


class RankExited(SegRtError, RuntimeError):
    """A branch-parallel rank process ended without answering (killed, out of memory, crashed)."""


class ExportValidationError(SegRtError, RuntimeError):
    """An exported model disagrees with torch beyond the tolerance."""


class SEGAlreadyInstalled(SegRtError, ValueError):
    """SEG processors asked onto a layer that already runs one: another live SEG patch owns the
    model's attention there (docs/design.md, "Who owns a patch"). Remove that patch first."""


class SEGNotApplied(SegRtError, RuntimeError):
    """SEG was active in a forward (perturbed rows present) but no query was perturbed: the SEG
    processors were not reached (replaced, bypassed, or their layers never ran). Raised instead of
    silently returning the unperturbed (CFG-only) prediction."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none): what a
    one-line error report shows of an error raised by a library."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def allocation_failure(exc: BaseException) -> str | None:
    """One line for an allocation failure (torch's CPU allocator or CUDA out of memory), ``None``
    for any other error: a request too big for the machine is bad input, not a crash."""
    text = first_line(exc)
    name = type(exc).__name__
    if (
        "DefaultCPUAllocator" in text
    ):  # "[enforce fail at alloc_cpu.cpp:..] err == 0. DefaultCPUAllocator: ..."
        text = text[text.index("DefaultCPUAllocator") :]
    if name == "OutOfMemoryError" or "CUDA out of memory" in text or text.startswith("DefaultCPUAllocator"):
        return f"out of memory: {text[:200]} (lower --height / --width, --frames, --num-images or the batch)"
    if isinstance(exc, MemoryError):
        return "out of memory (lower --height / --width, --frames, --num-images or the batch)"
    return None


class RequestTooLarge(SegRtError, ValueError):
    """A request whose estimated memory (``seg_rt.memory``) passes the bound: bad input, not a crash."""
