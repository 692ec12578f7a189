"""User-facing failures. A stage prints one line for these and exits non-zero; anything else is a bug."""


class PipelineError(Exception):
    """Base: the message names the cause (a config key, a file, a field) and the fix."""


class ConfigError(PipelineError, ValueError):
    """A malformed or inconsistent config; the message starts with the key path."""


class ShardError(PipelineError):
    """A hand-off that cannot be used: the message names the file and the failed check."""


class InputError(PipelineError):
    """Missing or unusable input: a model, a tokenizer, a corpus too small for the budget."""


class TimeLimit(Exception):
    """The scheduler's warning before a job's time limit: the stage stops at a safe point, exits
    REQUEUE_EXIT and its job is requeued (cluster/requeue.sh). Not a failure."""


REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again"; the sbatch scripts requeue the job on it
