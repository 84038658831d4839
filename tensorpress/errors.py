"""Errors meant for people.

Every error a user can cause (a bad model file, an unsupported operator, an artifact built for another
GPU, a shape a kernel cannot take, a corrupt tuning log, ...) is a `TensorpressError` whose message is
one sentence: what went wrong, where, and what to do. The CLI prints it and exits with status 1; any
other exception is a bug in tensorpress and keeps its traceback.

This module imports nothing heavy: the runtime bundle ships it.
"""


class TensorpressError(Exception):
    """A problem with the user's input that the user can fix; str(err) is one sentence."""


class ModelImportError(TensorpressError):
    """The model file/folder/module cannot be read or imported."""


class UnsupportedOperatorError(ModelImportError):
    """The model uses an operator the frontend cannot translate."""


class ConfigError(TensorpressError):
    """A compile option, recipe or format name is invalid."""


class ShapeError(TensorpressError):
    """A tensor shape a kernel cannot take."""


class ArtifactError(TensorpressError):
    """An artifact is missing, truncated, corrupt, or of an unknown format version."""


class DeviceMismatchError(ArtifactError):
    """An artifact was built for another target or GPU architecture than the device it is loaded on."""


class InputError(TensorpressError):
    """Inputs given to a compiled model have the wrong names, shapes or dtypes."""


class TuningLogError(TensorpressError):
    """A tuning log is unreadable or does not match this tensorpress/TVM version."""


class InternalCompileError(TensorpressError):
    """TVM failed inside a compile (a tensorpress bug): one sentence naming the stage, kernel and target;
    the original error is chained as __cause__."""


class RpcTrackerError(TensorpressError):
    """A TVM RPC tracker cannot be reached, or no RPC server is registered with it under the given key."""
