"""Error types of the job; each carries the process exit code it ends the job with."""


class JobError(Exception):
    """An error the job reports as one line, without a traceback."""

    exit_code = 1


class InputError(JobError):
    """Bad input the user must fix (spec, dataset, model, output): exit code 2, no retry helps."""

    exit_code = 2


class StorageError(JobError):
    """A storage URI that cannot be read or written (missing bucket or key, access denied, unreachable)."""

    exit_code = 2
