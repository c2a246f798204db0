"""Errors of the data pipeline. Each names the file and, where there is one, the record."""


class DataError(ValueError):
    """Base class: something on disk is not what the data pipeline expects."""


class AnnotationError(DataError):
    """An annotation json or partition txt that cannot be read, or a record with a malformed field."""


class DataFileError(DataError):
    """A missing, unreadable, truncated or mis-shaped image or feature file."""

    def __init__(self, path, problem):
        super().__init__(f'{path}: {problem}')
        self.path = str(path)
        self.problem = problem


class BadRecordError(DataError):
    """A record that cannot be loaded: which record (index and where it is listed), and why."""

    def __init__(self, index, source, reason):
        super().__init__(f'record {index} ({source}): {reason}')
        self.index = index
        self.source = source
        self.reason = reason
