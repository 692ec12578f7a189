"""User-facing failures. A stage prints one line for these and exits non-zero; anything else is a bug."""


class PipelineError(Exception):
    """Base: the message names the cause (a config key, a file, a field) and the fix."""


class ConfigError(PipelineError, ValueError):
    """A malformed or inconsistent config; the message starts with the key path."""


class ShardError(PipelineError):
    """A hand-off that cannot be used: the message names the file and the failed check."""


class InputError(PipelineError):
    """Missing or unusable input: a model, a tokenizer, a corpus too small for the budget."""
