"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Bad or missing data: the message is one line and names the path or source, so the CLI
    can print it and exit without a traceback."""
