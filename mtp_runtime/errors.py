"""The exception hierarchy: every failure a user can cause is an MTPRuntimeError subclass."""


class MTPRuntimeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MTPRuntimeError, ValueError):
    """config.json is missing, unreadable, of an unsupported model type, or lacks a field."""


class CheckpointError(MTPRuntimeError):
    """The weights folder is missing files, or its tensors do not match the config."""


class GenerationSettingsError(MTPRuntimeError, ValueError):
    """A generation argument (sampling, draft shape, lengths) is out of range."""


class TrainingSettingsError(MTPRuntimeError, ValueError):
    """A training setting (steps, sizes, rates, --arch, the run folder) is of the wrong type or out of range."""


class NoMTPModulesError(MTPRuntimeError):
    """Speculative drafting was asked of a checkpoint that has no MTP modules."""

    def __init__(self, message: str = "this checkpoint has no MTP modules, so it cannot draft; use draft='none', or "
                                      "add modules with `mtp-runtime train --mtp-only`"):
        super().__init__(message)


class TokenizerError(MTPRuntimeError):
    """A text prompt was given but the model folder has no tokenizer."""


class CacheCapacityError(MTPRuntimeError):
    """The sequence would not fit in the model's maximum positions."""


class InsufficientMemoryError(MTPRuntimeError, MemoryError):
    """A request's caches and buffers would not fit in the device's free memory."""


class DeviceError(MTPRuntimeError):
    """The requested device, dtype or kernel is not available here."""


class NumericalError(MTPRuntimeError):
    """NaN or Inf appeared in the model's activations."""


class ParallelError(MTPRuntimeError, ValueError):
    """The model cannot be split over the requested ranks, or the torchrun environment is incomplete."""
