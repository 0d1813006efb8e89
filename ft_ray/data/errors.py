"""The one error type of the data layer.

A `DataError` means the input (a source, a tokenizer, a shard directory) is unusable. Its message
names the file or field at fault so the CLI can print it as one line and training can refuse to
start before anything expensive happens.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: the message names the source, file or manifest field at fault."""
