"""The exception hierarchy: every failure a user can cause is an MTPRuntimeError subclass."""


class MTPRuntimeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MTPRuntimeError, ValueError):
    """config.json is missing, unreadable, of an unsupported model type, or lacks a field."""


class CheckpointError(MTPRuntimeError):
    """The weights folder is missing files, or its tensors do not match the config."""


class GenerationSettingsError(MTPRuntimeError, ValueError):
    """A generation argument (sampling, draft shape, lengths) is out of range."""


class NoMTPModulesError(MTPRuntimeError):
    """Speculative drafting was asked of a checkpoint that has no MTP modules."""


class TokenizerError(MTPRuntimeError):
    """A text prompt was given but the model folder has no tokenizer."""


class CacheCapacityError(MTPRuntimeError):
    """The sequence would not fit in the model's maximum positions."""


class DeviceError(MTPRuntimeError):
    """The requested device, dtype or kernel is not available here."""


class NumericalError(MTPRuntimeError):
    """NaN or Inf appeared in the model's activations."""


class ParallelError(MTPRuntimeError, ValueError):
    """The model cannot be split over the requested ranks, or the torchrun environment is incomplete."""
