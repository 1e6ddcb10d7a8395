"""Errors that reach the user as one line: ``gpumerge: error: ...`` and exit code 2."""


class GpumergeError(Exception):
    """Base class: anything the user can fix by changing what they asked for."""


class SpecError(GpumergeError):
    """The command line or recipe asks for something invalid."""


class CheckpointError(GpumergeError):
    """A checkpoint is missing, unreadable, truncated, corrupt or unsupported."""


class IncompatibleCheckpointsError(GpumergeError):
    """Model 1 and model 2 cannot be blended as asked (shapes, layer counts, buffers)."""


class OutputError(GpumergeError):
    """The output location is unusable, or the output would be wrong (overflow)."""


def brief(text: object, *, limit: int = 200) -> str:
    """Another library's message for one of ours: on one line, and cut at a word boundary (``...`` marks the cut),
    never mid-word."""
    words = " ".join(str(text).split())
    if len(words) <= limit:
        return words
    cut = words.rfind(" ", 0, limit + 1)
    return (words[:cut] if cut > limit // 2 else words[:limit]).rstrip(" ,;:(") + " ..."
