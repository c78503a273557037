"""Errors that cross a stage boundary, as importable types (no torch, no Ray).

A stage raises one of these; Ray hands the caller an exception that is an instance of the same
class (wrapped: `unwrap` gives the original back), and the HTTP layer maps each class to a status
in one table (deployments/api/routes.py). Nothing matches class names as strings.
"""

from __future__ import annotations


class AudioError(ValueError):
    """Input that is not usable speech audio: not audio at all, empty, non-finite, too long or
    too short."""


class AudioLengthError(AudioError):
    """Audio that decodes but is longer than the limit or shorter than one video frame."""


class AvatarNotFound(KeyError):
    """No prepared avatar with this id on the lip-sync stage (in memory or in its cache folder)."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument
        return f"no prepared avatar {self.args[0]!r}" if self.args else "no prepared avatar"


class LoraError(ValueError):
    """A LoRA that cannot be applied here: bad target, keys that match nothing, a bad file."""


class LoraNotFound(LoraError):
    """No LoRA of that name is loaded on the expert."""


class LoraBusyError(RuntimeError):
    """A LoRA change was asked for while the expert is denoising (it would change a running job)."""


class MissingWeightsError(RuntimeError):
    """A weight file a profile needs is not on local disk."""

    def __init__(self, what: str, profile: str | None = None):
        self.what, self.profile = what, profile
        name = profile or "PROFILE"
        super().__init__(f"missing weights: {what}. Serving never downloads; fetch the profile's "
                         f"files first with: avatar-serve download {name}")

    def __reduce__(self):  # keep both arguments when Ray pickles it across a hop
        return type(self), (self.what, self.profile)


def unwrap(exc: BaseException) -> BaseException:
    """The exception a stage raised, from what a handle call raised (Ray wraps it in a
    RayTaskError subclass of the same class; `cause` is the original)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
